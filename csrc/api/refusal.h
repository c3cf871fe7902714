// How the C++ autograd raises its refusals (double backward, a mask that requires grad, a
// saturated row): a c10::Error (RuntimeError) by default, which is what C++ callers get.
// The Python module (csrc/python_module.cpp) installs a handler that raises
// ring_attn.errors.RingAttnError instead, so that from Python `except RingAttnException`
// catches the backward's refusals as it catches every other error ring_attn raises
// (errors.py); the engine carries a Python exception to the caller unchanged.
#pragma once

namespace ring_attn {
namespace detail {

// Must throw. Called with the message, which starts "ring_attn:".
using RefusalHandler = void (*)(const char* message);

void set_refusal_handler(RefusalHandler handler);

[[noreturn]] void refuse(const char* message);

}  // namespace detail
}  // namespace ring_attn
