"""ring_attn's exception types: each a subclass of the builtin type torch raises for the
same kind of bad input, so `except RuntimeError` (or TypeError, IndexError,
NotImplementedError) catches ours exactly where it would catch torch's SDPA, while
`except RingAttnException` catches every error ring_attn raises itself.

The table of which type torch uses for which input was measured against torch 2.15's
public SDPA and is asserted case by case in tests/test_errors.py: RuntimeError for bad
values (shapes, dtypes, devices, dropout range, is_causal with a mask), TypeError for an
argument of the wrong Python type (a list as attn_mask, a str dropout_p, an int
is_causal), IndexError for a 0-D or 1-D attn_mask, NotImplementedError for complex inputs.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class RingAttnException(Exception):
    """Base of every exception ring_attn raises itself."""


class RingAttnError(RingAttnException, RuntimeError):
    """A bad value (shape, dtype, device, range) or an unsupported use, as torch's
    RuntimeError."""


class RingAttnTypeError(RingAttnException, TypeError):
    """An argument of the wrong Python type, as torch's argument parser raises."""


class RingAttnIndexError(RingAttnException, IndexError):
    """attn_mask with fewer than 2 dims (torch indexes dim -2 and raises IndexError)."""


class RingAttnNotImplementedError(RingAttnException, NotImplementedError):
    """No kernel for this dtype or device."""


DOUBLE_BACKWARD = "ring_attn: double backward (create_graph=True) is not supported"
SATURATED = ("ring_attn: a query row whose every key is masked by a huge finite additive "
             "value (|log-sum-exp| > 2^33, e.g. torch.finfo(float32).min) receives a non-zero "
             "gradient; its backward cannot be exact (log(n) is below float64's spacing "
             "there). Use a bool mask (or -inf), or give such rows a zero upstream gradient "
             "(a loss that ignores them)")


def refuse_double_backward() -> None:
    """Call first thing in a backward. The autograd engine runs a backward with grad mode
    on exactly when the caller asked for create_graph=True; our backward kernels have no
    derivative, so going on would return gradients that silently carry no graph (or
    zeros as second-order gradients). Refuse at the first backward, before any work or
    communication: the error then points at the call that asked for it."""
    import torch
    if torch.is_grad_enabled():
        raise RingAttnError(DOUBLE_BACKWARD)


def call_op(op: Callable[..., T], *args: Any) -> T:
    """op(*args), with the errors ring_attn's C++ rules raise (c10 errors, which reach
    Python as RuntimeError, IndexError, NotImplementedError or TypeError, with a message
    starting "ring_attn:") re-raised as the RingAttn* type of the same builtin type and
    message: the one translation, used wherever Python calls a checking op. Under
    torch.compile the op is called as is: dynamo reports a failing call its own way."""
    import torch
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except RingAttnException:
        raise
    except (RuntimeError, IndexError, TypeError) as e:
        if not str(e).startswith("ring_attn:"):
            raise
        # NotImplementedError is a RuntimeError: test it first.
        kind = next(k for base, k in _OURS if isinstance(e, base))
        raise kind(str(e)) from None


_OURS = ((NotImplementedError, RingAttnNotImplementedError), (RuntimeError, RingAttnError),
         (IndexError, RingAttnIndexError), (TypeError, RingAttnTypeError))
