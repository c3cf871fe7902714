"""Hugging Face transformers: train an HF causal LM with its sequence split across ranks.

    from ring_attn.integrations.transformers import prepare_model, shard_batch
    model = prepare_model(model, group=None, layout="zigzag")   # once
    out = model(**shard_batch(batch, layout="zigzag"))         # every step; out.loss is
    out.loss.backward()                                        # this rank's share
    all_reduce_gradients(model)                                # sum the ranks' shares

Every rank holds the same full batch (input_ids [B, S], optional attention_mask, labels);
`shard_batch` keeps this rank's tokens and the exact single-process loss follows. What HF
does, and what this module does instead:

  * Attention: registered in transformers' `AttentionInterface` as "ring_attn" (one name
    per group and layout). Each layer's local Q/K/V shards go to `ring_attn.ring_attention`
    with is_causal=True on GLOBAL positions, the layer's `scaling` and dropout; GQA K/V
    keep their own head count (never expanded, half the bytes on the wire at 2 groups).
  * Masks: registered in `AttentionMaskInterface` under the same name, so HF never builds
    a [B, 1, S_local, S] mask on local positions. Key padding reaches the ring as a
    [B, 1, 1, S] key mask (from the full-length 2-D attention_mask, or all-gathered from a
    sharded one), or no mask at all when nothing is padded.
  * Position ids: HF reads non-consecutive position_ids (a zigzag or striped shard) with no
    attention_mask as packed sequences. `prepare_model`'s forward pre-hook fills global
    position_ids when they are missing and a full-length all-ones attention_mask when that
    is missing, so packed-sequence detection never runs; position_ids that are not the
    layout's global positions (plus a constant) with no mask are refused (eager only).
  * Labels: HF shifts labels inside each shard (token t predicts t+1 of the SAME shard,
    which is wrong at every shard edge). `shard_batch` shifts on the full sequence and
    passes `shift_labels` (used by HF's ForCausalLMLoss) and the global
    `num_items_in_batch`, so each rank's loss is its share of the full-sequence loss and
    the sum over ranks is the single-process loss.

  * Sliding windows and soft-capping: a layer's sliding_window W (Mistral, Gemma 2/3, ...)
    reaches the kernel as window (W - 1, 0) on global positions, and softcap (Gemma 2's
    attn_logit_softcapping) as softcap; the mask hook checks that transformers' mask
    function is exactly the windowed causal one before it drops it.

Refused with an error rather than computed differently: a KV cache holding earlier tokens
(decoding; a fresh cache in a training forward is fine), chunked attention (Llama 4),
attention sinks (gpt-oss's s_aux), unknown tensor arguments, attention-weight outputs, position biases, bidirectional or custom
mask functions (packed sequences, token-type overlays, chunked attention), 4-D masks whose
key dimension is not the full sequence.

Gradient checkpointing (reentrant or not) is exact: the recompute calls the same registered
function, and torch restores the RNG so dropout redraws the same seed. transformers is an
optional dependency: this module imports it, `ring_attn` does not.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from ..comm import group_info
from ..layout import check_layout, global_positions, required_multiple, shard_tensor, \
    unshard_tensors
from ..ring import ring_attention

Tensor = torch.Tensor
IGNORE_INDEX = -100  # HF's label ignore index


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# --- Masks ----------------------------------------------------------------------------

def _full_key_mask(attention_mask: Tensor, s_local: int, group: Any, layout: str) -> Tensor:
    """The [B, S] key-padding mask of the whole sequence from a 2-D attention_mask that
    is either full-length already or this rank's shard (then all-gathered)."""
    info = group_info(group)
    s = s_local * info.world_size
    length = attention_mask.shape[-1]
    if length == s:
        return attention_mask.to(torch.bool)
    if length != s_local:
        raise ValueError(
            f"ring_attn: the 2-D attention_mask has {length} columns but this rank holds "
            f"{s_local} tokens of a {s}-token sequence over {info.world_size} ranks; pass the "
            f"full-length mask [B, {s}] (as shard_batch does) or this rank's shard [B, {s_local}]")
    # gloo has no bool all_gather; uint8 keeps it one byte per token.
    mine = attention_mask.to(torch.uint8).contiguous()
    parts = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(parts, mine, group=group)
    return unshard_tensors(parts, layout, dim=1).to(torch.bool)


def _is_sliding_window_causal(mask_function: Callable, window: int) -> bool:
    """Whether transformers' index-based mask function is exactly causal with a sliding
    window of `window` keys (key j kept for query i iff i - window < j <= i), probed on
    the queries where it could differ: its closures are opaque (sliding-window and chunked
    masks both arrive with local_size set), and a packed-sequence or overlay composition
    must not pass for a plain window. The window itself reaches the kernel through the
    attention call's sliding_window argument."""
    w = int(window)
    rows = torch.tensor(sorted({0, 1, w - 1, w, w + 1, 2 * w, 2 * w + 1}), dtype=torch.long)
    cols = torch.arange(2 * w + 2, dtype=torch.long)
    q, k = rows[:, None], cols[None, :]
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q, k)
    except Exception:  # noqa: BLE001  (not index-based: not the plain window)
        return False
    want = (k <= q) & (k > q - w)
    return isinstance(got, Tensor) and got.shape == want.shape and bool((got == want).all())


def _make_mask_function(group: Any, layout: str) -> Callable[..., Optional[Tensor]]:
    def ring_key_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0,
                      kv_offset: int = 0, mask_function: Callable = causal_mask_function,
                      attention_mask: Optional[Tensor] = None, local_size: Optional[int] = None,
                      use_vmap: bool = False, config: Any = None, **kwargs: Any
                      ) -> Optional[Tensor]:
        """transformers' mask hook: a [B, 1, 1, S] bool key mask (True = attend), or None.
        Causality is NOT in it: the kernel applies it on global positions."""
        s = q_length * group_info(group).world_size
        past = q_offset if isinstance(q_offset, int) else 0  # a tensor only for static caches
        if kv_length not in (q_length, s) or past != 0:
            raise NotImplementedError(
                f"ring_attn: transformers sizes the mask for {kv_length} keys and {q_length} "
                "queries per rank: a KV cache with earlier tokens (past_key_values, decoding) "
                "cannot be used with sequence shards; run with use_cache=False or an empty cache")
        sliding = (local_size is not None and not use_vmap
                   and _is_sliding_window_causal(mask_function, local_size))
        if mask_function is not causal_mask_function and not sliding:
            name = type(config).__name__ if config is not None else "the model's config"
            raise NotImplementedError(
                f"ring_attn: {name} asks transformers for a mask other than causal, sliding-"
                f"window causal and key padding (mask function "
                f"{getattr(mask_function, '__name__', mask_function)!r}: chunked attention, "
                "packed sequences detected from position_ids, a bidirectional model, or a "
                "token-type overlay); the ring computes (windowed) causal attention with key "
                "padding only. For packed-looking position_ids, pass attention_mask "
                "(shard_batch and prepare_model do)")
        if attention_mask is None:
            return None
        full = _full_key_mask(attention_mask, q_length, group, layout)
        # No padding: no mask, so the kernel runs its mask-free causal path. The test is a
        # host sync, skipped under torch.compile (which then keeps the all-True mask).
        if not _is_compiling() and bool(full.all()):
            return None
        return full.view(full.shape[0], 1, 1, s)
    return ring_key_mask


# --- Attention ------------------------------------------------------------------------

def _layer_window(module: torch.nn.Module, passed: Optional[int], where: str) -> Optional[int]:
    """The layer's sliding window. Most models pass sliding_window to the attention
    function; some (Qwen2-MoE, PhiMoE, ... in transformers 5.24) build a sliding-window
    mask but pass nothing, which the SDPA path honours through the mask and this
    integration would silently drop. So the window also comes from the module or the
    config's layer_types, and a config with a window that cannot be placed is refused."""
    if passed is not None:
        return int(passed)
    if getattr(module, "sliding_window", None) is not None:
        return int(module.sliding_window)
    cfg = getattr(module, "config", None)
    cfg_window = getattr(cfg, "sliding_window", None)
    if cfg_window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if types is not None and idx is not None and idx < len(types):
        return int(cfg_window) if types[idx] == "sliding_attention" else None
    raise NotImplementedError(
        f"{where}: the config sets sliding_window={cfg_window} but transformers passed no "
        "window to the attention function and the layer's type is unknown; ring_attn "
        "cannot tell whether this layer is windowed")


# Tensor arguments transformers passes down to the attention function that do not change
# its result here: positions reach the ring through the layout (prepare_model's pre-hook
# checks them), cache positions only index a KV cache (refused above), and the loss
# arguments (shard_batch's) flow through the model's **kwargs untouched. Any other tensor
# (cu_seq_lens_q/k of packed batches, sparse key indices, ...) is refused.
_IGNORED_TENSOR_KWARGS = frozenset({"position_ids", "cache_position", "num_items_in_batch",
                                    "labels", "shift_labels"})


def _make_attention_function(group: Any, layout: str) -> Callable[..., tuple[Tensor, None]]:
    def ring_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                               value: Tensor, attention_mask: Optional[Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               is_causal: Optional[bool] = None, **kwargs: Any
                               ) -> tuple[Tensor, None]:
        """transformers' attention hook: query [B, Hq, S_local, D], key/value
        [B, Hk, S_local, D] shards -> ([B, S_local, Hq, Dv] shard, None)."""
        where = f"ring_attn: layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
        s_local = query.shape[2]
        s = s_local * group_info(group).world_size
        if key.shape[2] != s_local:
            raise NotImplementedError(
                f"{where}: key/value hold {key.shape[2]} tokens but query {s_local}: a KV cache "
                "with earlier tokens (past_key_values, decoding) cannot be used with sequence "
                "shards; run with use_cache=False or an empty cache")
        window = _layer_window(module, kwargs.get("sliding_window"), where)
        # transformers' sliding window W keeps i - W < j <= i (its flash path passes
        # window_size=(W - 1, W - 1) with causal): flash-attn's left bound W - 1.
        window = None if window is None or window >= s else (int(window) - 1, 0)
        softcap = kwargs.get("softcap")
        for name in ("s_aux", "sinks"):
            if kwargs.get(name) is not None:
                # gpt-oss's learned per-head sinks join each row's softmax denominator;
                # ignoring them would train a different model with no error.
                raise NotImplementedError(f"{where}: attention sinks ({name}=, gpt-oss and "
                                          "others) are not supported by ring_attn")
        if kwargs.get("position_bias") is not None:
            raise NotImplementedError(f"{where}: position_bias is not supported by ring_attn")
        unknown = sorted(n for n, x in kwargs.items()
                         if isinstance(x, Tensor) and n not in _IGNORED_TENSOR_KWARGS)
        if unknown:
            # A tensor we do not know may select keys (sparse indices), pack documents
            # (cu_seq_lens_*) or bias scores: refuse rather than compute something else.
            raise NotImplementedError(f"{where}: transformers passed {unknown} to the "
                                      "attention function; ring_attn does not know what they "
                                      "change, so it refuses rather than ignore them")
        if kwargs.get("output_attentions"):
            raise NotImplementedError(f"{where}: output_attentions=True: the ring never forms "
                                      "the attention weights")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            raise NotImplementedError(f"{where}: non-causal attention is not supported by the "
                                      "transformers integration (decoder models only)")
        if attention_mask is not None and (attention_mask.dim() != 4
                                           or attention_mask.shape[-1] != s):
            hint = (" — its key dimension is this rank's length, so it was built on local "
                    "positions (e.g. by transformers' packed-sequence detection, or a mask "
                    "prepared before sharding)") if attention_mask.shape[-1] == s_local else ""
            raise ValueError(
                f"{where}: attention_mask must be [B, 1, S_local or 1, S] with S={s} keys in "
                f"global order, got shape {tuple(attention_mask.shape)}{hint}")
        # One node under torch.compile: the ring is an opaque op (ring.py).
        out = ring_attention(query, key, value, is_causal=True, scale=scaling,
                             attn_mask=attention_mask, dropout_p=float(dropout), group=group,
                             layout=layout, window=window, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    return ring_attention_forward


def register(group: Optional[Any] = None, layout: str = "zigzag") -> str:
    """Register ring attention for (group, layout) in transformers' attention and mask
    interfaces; returns the attn_implementation name: "ring_attn" for the default group
    and zigzag, "ring_attn_<layout>[_<group name>]" otherwise. Idempotent."""
    check_layout(layout)
    name = "ring_attn" if layout == "zigzag" else f"ring_attn_{layout}"
    if group is not None:
        name += f"_{group.group_name}"
    AttentionInterface.register(name, _make_attention_function(group, layout))
    AttentionMaskInterface.register(name, _make_mask_function(group, layout))
    return name


# --- The model and the batch ----------------------------------------------------------

def _make_pre_hook(group: Any, layout: str) -> Callable[..., Any]:
    def fill_positions_and_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return None
        b, s_local = ref.shape[0], ref.shape[1]
        info = group_info(group)
        expected = global_positions(info.rank, info.world_size, s_local, layout, ref.device)
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() == 1:  # ring_attn.positions(...) as is: [S_local]
            pos = kwargs["position_ids"] = pos.unsqueeze(0).expand(b, -1)
        if kwargs.get("attention_mask") is None:
            if pos is not None and not _is_compiling():
                # With no mask HF would read non-consecutive positions as packed sequences.
                d = pos - expected
                if not bool((d == d[..., :1]).all()):
                    raise ValueError(
                        f"ring_attn: position_ids (rank {info.rank}) are not this rank's global "
                        f"positions in the {layout!r} layout (plus a constant); with no "
                        "attention_mask transformers would treat them as packed sequences, "
                        "which the ring cannot do. Use ring_attn.positions / shard_batch")
            kwargs["attention_mask"] = torch.ones(b, s_local * info.world_size,
                                                  dtype=torch.long, device=ref.device)
        if pos is None:
            kwargs["position_ids"] = expected.unsqueeze(0).expand(b, -1)
        return args, kwargs
    return fill_positions_and_mask


def prepare_model(model: torch.nn.Module, group: Optional[Any] = None,
                  layout: str = "zigzag") -> torch.nn.Module:
    """Make an HF model run on sequence shards over `group` in `layout`: registers and sets
    the "ring_attn" attention implementation and adds a forward pre-hook that fills global
    position_ids and a full-length attention_mask when they are missing (see the module
    docstring). Returns the model (changed in place); calling it again replaces the hook.
    Feed it `shard_batch(...)`; after backward, `all_reduce_gradients(model, group)`."""
    name = register(group, layout)
    model.set_attn_implementation(name)
    old = getattr(model, "_ring_attn_hook", None)
    if old is not None:
        old.remove()
    model._ring_attn_hook = model.register_forward_pre_hook(_make_pre_hook(group, layout),
                                                            with_kwargs=True)
    return model


def shard_batch(batch: Mapping[str, Any], *, layout: str = "zigzag", group: Optional[Any] = None,
                pad_token_id: int = 0) -> dict[str, Any]:
    """This rank's part of a full batch (identical on every rank) for a prepared model.

    batch: input_ids [B, S], and optionally attention_mask [B, S] and labels [B, S]
    (unshifted, IGNORE_INDEX = -100 ignored, as for HF causal LMs). Other entries pass
    through unchanged. A length the layout cannot split is padded at the end (pad_token_id,
    attention_mask 0, label -100): padded keys come after every real query, so nothing
    changes for the real tokens.

    Returns input_ids and position_ids [B, S_local] (global positions), attention_mask
    [B, S] left FULL-length (it is the ring's key mask, which covers every key; sharding it
    would only add an all-gather per forward), and with labels: `shift_labels` [B, S_local]
    (labels shifted on the FULL sequence, then sharded), `labels` = the same tensor (HF
    computes a loss only when labels is given; with shift_labels it does not shift again)
    and `num_items_in_batch`, the global count of predicted tokens, so each rank's loss is
    its share of the single-process loss and the ranks' losses sum to it.
    """
    info = group_info(group)
    out = dict(batch)
    ids = batch["input_ids"]
    b, s = ids.shape
    m = required_multiple(info.world_size, layout)
    pad = -s % m
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=pad_token_id)
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.long, device=ids.device)
        mask = torch.nn.functional.pad(mask, (0, pad), value=0)
    s_full = s + pad

    def shard(t: Tensor) -> Tensor:
        return shard_tensor(t, info.rank, info.world_size, layout, dim=1).contiguous()
    out["input_ids"] = shard(ids)
    out["position_ids"] = global_positions(info.rank, info.world_size, s_full // info.world_size,
                                           layout, ids.device).unsqueeze(0).expand(b, -1)
    if mask is not None:
        out["attention_mask"] = mask
    if labels is not None:
        # Token t predicts token t+1 of the FULL sequence; the last token predicts nothing.
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1 + pad), value=IGNORE_INDEX)
        local = shard(shifted)
        out["labels"] = local
        out["shift_labels"] = local
        out["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
    return out


def all_reduce_gradients(model: torch.nn.Module, group: Optional[Any] = None) -> None:
    """Sum every parameter gradient over the ranks of `group`: each rank's backward gives
    the gradient of its share of the loss, and the shares sum to the full-sequence loss.
    (With DDP over the same ranks, which averages, multiply the loss by the group size.)"""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or group_info(group).world_size == 1:
        return
    # Summed in float32 at least, so bf16 shares add without an extra rounding per rank.
    dt = torch.promote_types(grads[0].dtype, torch.float32)
    flat = torch.cat([g.reshape(-1).to(dt) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
