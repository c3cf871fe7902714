// The Python module ring_attn._C (setup.py only; the CMake library leaves it out): an empty
// module. Importing it loads this library, whose static initialisers register the ops; it
// also makes the C++ autograd's refusals (api/refusal.h) raise ring_attn's own
// RingAttnError, as every other error ring_attn raises in Python does.
#include <Python.h>
#include <torch/csrc/Exceptions.h>

#include "api/refusal.h"

namespace {

// Sets RingAttnError(message) as the current Python error and throws it as torch's
// python_error, which the autograd engine hands to the caller as that Python exception.
// Runs on the engine's thread with the GIL released: take it for the Python calls.
[[noreturn]] void raise_ring_attn_error(const char* message) {
  python_error err;
  {
    pybind11::gil_scoped_acquire gil;
    PyObject* errors = PyImport_ImportModule("ring_attn.errors");
    PyObject* cls = errors ? PyObject_GetAttrString(errors, "RingAttnError") : nullptr;
    if (cls != nullptr) PyErr_SetString(cls, message);  // else the import's error stands
    Py_XDECREF(cls);
    Py_XDECREF(errors);
    err.persist();  // torch 2.11 has no throw_python_error(): the same two steps
  }
  throw err;
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  ring_attn::detail::set_refusal_handler(&raise_ring_attn_error);
  return PyModule_Create(&module_def);
}
