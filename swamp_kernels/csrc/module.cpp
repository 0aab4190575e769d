// swamp_kernels._C: the Python module that loads the CUDA ops of swamp_kernels.
//
// Importing it runs the static op registrations of every family; Python then calls the
// ops as torch.ops.swamp_kernels.<op> (wrapped for the dispatcher in swamp_kernels/cuda.py).
// The module itself is empty, so it needs neither pybind11 nor torch's Python bindings.
//
// An op family <family> is three files here (setup.py and CMakeLists.txt pick up every
// *.cpp and *.cu):
//   <family>.h       its Entry structs and launcher declarations: plain C++, the interface
//                    between the two files below.
//   <family>.cu      kernels and launchers returning cudaError_t, built on multi_tensor.cuh.
//                    CUDA headers only: nvcc parses torch headers once per GPU architecture
//                    plus once for the host, ~50x the cost of the kernel itself.
//   <family>_op.cpp  schemas (TORCH_LIBRARY_FRAGMENT), input checks (tensor_checks.h) and
//                    the CUDA implementations (TORCH_LIBRARY_IMPL), which fill the entries
//                    and call the launcher under C10_CUDA_CHECK on the current stream.
#include <Python.h>

#include <torch/library.h>

// Owns the op namespace; each family adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(swamp_kernels, m) {}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "CUDA ops of swamp_kernels, called as torch.ops.swamp_kernels.<op>",
                               -1, nullptr};
  return PyModule_Create(&module);
}
