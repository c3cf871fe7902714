// The Python module ring_attn._C (setup.py only; the CMake library leaves it out): an empty
// module. Importing it loads this library, whose static initialisers register the ops. No
// pybind11 symbols are needed, which keeps an abi3 wheel possible.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
