// The module _C and its fronts of the common call, one per op family: an op front (normlab/ops/*.py) hands its
// arguments over as they came and gets the output, or None when the call is not plainly one this backend serves.
// Plainly: every tensor an exact torch.Tensor or nn.Parameter, strided, on the CPU; the input non-empty,
// fp32/bf16/fp16, its last dim the int (or 1-tuple of an int) normalized_shape; a weight or bias None or a vector
// of that size in the input's dtype (or fp32 for a half input); a residual of the input's shape and dtype; eps a
// finite float > 0 (or None for RMSNorm); DyT's alpha one element and its weight there; no __torch_function__
// mode and no torch.func transform active. For anything else the op file's Python checks take the call, and raise
// the errors. The operator is called as torch's bindings call theirs: through the dispatcher, without the GIL.

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "ops.h"

namespace normlab::cpu {
namespace {

// Each front's arguments, positional and counted (METH_FASTCALL).
bool count_is(const char* front, Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments, got %zd", front, expected, nargs);
  return false;
}

bool modes_or_transforms_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

bool plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return false;  // a subclass may override __torch_function__
  const Tensor& t = THPVariable_Unpack(obj);
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_nested();
}

bool served_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// normalized_shape as an int (or a 1-tuple of one), or -1.
int64_t normalized_size(PyObject* shape) {
  if (PyTuple_Check(shape)) {
    if (PyTuple_GET_SIZE(shape) != 1) return -1;
    shape = PyTuple_GET_ITEM(shape, 0);
  }
  if (!PyLong_CheckExact(shape)) return -1;
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(shape, &overflow);
  return overflow ? -1 : static_cast<int64_t>(n);
}

// The input, when it is plainly rows of `shape`: else null.
const Tensor* plain_input(PyObject* obj, PyObject* shape) {
  if (!plain_tensor(obj)) return nullptr;
  const Tensor& x = THPVariable_Unpack(obj);
  if (x.dim() == 0 || !served_dtype(x.scalar_type()) || x.numel() == 0) return nullptr;
  const int64_t n = normalized_size(shape);
  return n == x.size(-1) ? &x : nullptr;
}

// A parameter's dtype: the input's, or fp32 for a bf16/fp16 input (master weights).
bool param_dtype_ok(at::ScalarType param, at::ScalarType input) {
  return param == input || (param == at::kFloat && (input == at::kBFloat16 || input == at::kHalf));
}

// A weight or bias: None, or a vector of the row's size in a parameter's dtype.
bool plain_param(PyObject* obj, const Tensor& x, OptTensor& param) {
  if (obj == Py_None) return true;
  if (!plain_tensor(obj)) return false;
  const Tensor& p = THPVariable_Unpack(obj);
  if (p.dim() != 1 || p.size(0) != x.size(-1) || !param_dtype_ok(p.scalar_type(), x.scalar_type())) return false;
  param = p;
  return true;
}

// A fused add's residual: the input's shape and dtype.
const Tensor* plain_residual(PyObject* obj, const Tensor& x) {
  if (!plain_tensor(obj)) return nullptr;
  const Tensor& r = THPVariable_Unpack(obj);
  return r.scalar_type() == x.scalar_type() && r.sizes() == x.sizes() ? &r : nullptr;
}

bool plain_eps(PyObject* obj, double& eps) {
  if (!PyFloat_CheckExact(obj)) return false;
  eps = PyFloat_AS_DOUBLE(obj);
  return eps > 0 && eps < INFINITY;
}

// RMSNorm's eps (None: fp32's machine epsilon, torch's default), casting and finite offset (a float or an int).
bool plain_rms_options(PyObject* eps_obj, PyObject* casting_obj, PyObject* offset_obj, double& eps,
                       c10::string_view& casting, double& offset) {
  if (eps_obj == Py_None) {
    eps = static_cast<double>(std::numeric_limits<float>::epsilon());
  } else if (!plain_eps(eps_obj, eps)) {
    return false;
  }
  if (!PyUnicode_CheckExact(casting_obj)) return false;
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(casting_obj, &size);
  if (!text) {
    PyErr_Clear();
    return false;
  }
  casting = c10::string_view(text, static_cast<size_t>(size));
  if (casting != "llama" && casting != "gemma" && casting != "none") return false;
  if (PyFloat_CheckExact(offset_obj)) {
    offset = PyFloat_AS_DOUBLE(offset_obj);
  } else if (PyLong_CheckExact(offset_obj)) {
    offset = PyLong_AsDouble(offset_obj);
    if (offset == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return std::isfinite(offset);
}

PyObject* wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }

// (a, b) as a tuple, for the fused fronts' (y, s).
PyObject* wrap_pair(Tensor a, Tensor b) {
  PyObject* pair = PyTuple_New(2);
  if (!pair) return nullptr;
  for (auto [i, t] : {std::pair{0, &a}, std::pair{1, &b}}) {
    PyObject* item = wrap(std::move(*t));
    if (!item) {
      Py_DECREF(pair);
      return nullptr;
    }
    PyTuple_SET_ITEM(pair, i, item);
  }
  return pair;
}

// `call()` (the operator) without the GIL, as torch's bindings run theirs; its output, or its two, for Python.
template <class Call>
PyObject* released(Call&& call) {
  auto outputs = [&] {
    pybind11::gil_scoped_release no_gil;
    return call();
  }();
  if constexpr (std::is_same_v<decltype(outputs), Tensor>) {
    return wrap(std::move(outputs));
  } else {
    return wrap_pair(std::move(std::get<0>(outputs)), std::move(std::get<1>(outputs)));
  }
}

// layer_norm(input, normalized_shape, weight, bias, eps) -> y | None
PyObject* layer_norm_front(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!count_is("layer_norm", nargs, 5)) return nullptr;
  const Tensor* x = plain_input(args[0], args[1]);
  OptTensor weight, bias;
  double eps = 0;
  if (!x || !plain_param(args[2], *x, weight) || !plain_param(args[3], *x, bias) || !plain_eps(args[4], eps) ||
      modes_or_transforms_active())
    Py_RETURN_NONE;
  return released([&] { return std::get<0>(NORMLAB_OP("layer_norm", LnFwdSig).call(*x, weight, bias, eps)); });
  END_HANDLE_TH_ERRORS
}

// add_layer_norm(input, residual, normalized_shape, weight, bias, eps) -> (y, s) | None; s in the input's dtype
PyObject* add_layer_norm_front(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!count_is("add_layer_norm", nargs, 6)) return nullptr;
  const Tensor* x = plain_input(args[0], args[2]);
  const Tensor* residual = x ? plain_residual(args[1], *x) : nullptr;
  OptTensor weight, bias;
  double eps = 0;
  if (!residual || !plain_param(args[3], *x, weight) || !plain_param(args[4], *x, bias) ||
      !plain_eps(args[5], eps) || modes_or_transforms_active())
    Py_RETURN_NONE;
  return released([&] {
    auto [y, sum, mean, rstd] = NORMLAB_OP("add_layer_norm", AddLnSig).call(*x, *residual, weight, bias, eps,
                                                                              x->scalar_type());
    return std::tuple{y, sum};
  });
  END_HANDLE_TH_ERRORS
}

// rms_norm(input, normalized_shape, weight, eps, casting, offset, bias) -> y | None; the statistic over the whole row
PyObject* rms_norm_front(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!count_is("rms_norm", nargs, 7)) return nullptr;
  const Tensor* x = plain_input(args[0], args[1]);
  OptTensor weight, bias;
  double eps = 0, offset = 0;
  c10::string_view casting;
  if (!x || !plain_param(args[2], *x, weight) || !plain_rms_options(args[3], args[4], args[5], eps, casting, offset) ||
      !plain_param(args[6], *x, bias) || modes_or_transforms_active())
    Py_RETURN_NONE;
  return released([&] {
    return std::get<0>(NORMLAB_OP("rms_norm", RmsFwdSig).call(*x, weight, eps, casting, offset, x->size(-1), bias));
  });
  END_HANDLE_TH_ERRORS
}

// add_rms_norm(input, residual, normalized_shape, weight, eps, casting, offset) -> (y, s) | None
PyObject* add_rms_norm_front(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!count_is("add_rms_norm", nargs, 7)) return nullptr;
  const Tensor* x = plain_input(args[0], args[2]);
  const Tensor* residual = x ? plain_residual(args[1], *x) : nullptr;
  OptTensor weight;
  double eps = 0, offset = 0;
  c10::string_view casting;
  if (!residual || !plain_param(args[3], *x, weight) ||
      !plain_rms_options(args[4], args[5], args[6], eps, casting, offset) || modes_or_transforms_active())
    Py_RETURN_NONE;
  return released([&] {
    auto [y, sum, rstd] = NORMLAB_OP("add_rms_norm", AddRmsSig)
                              .call(*x, *residual, weight, eps, casting, offset, x->size(-1), x->scalar_type());
    return std::tuple{y, sum};
  });
  END_HANDLE_TH_ERRORS
}

// dyt(input, alpha, weight, bias) -> y | None; the weight a vector of the last dim, alpha a one-element tensor
PyObject* dyt_front(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!count_is("dyt", nargs, 4)) return nullptr;
  if (!plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2])) Py_RETURN_NONE;
  const Tensor& x = THPVariable_Unpack(args[0]);
  const Tensor& alpha = THPVariable_Unpack(args[1]);
  OptTensor weight, bias;
  if (x.dim() == 0 || !served_dtype(x.scalar_type()) || x.numel() == 0 || alpha.numel() != 1 ||
      !param_dtype_ok(alpha.scalar_type(), x.scalar_type()) || !plain_param(args[2], x, weight) ||
      !plain_param(args[3], x, bias) || modes_or_transforms_active())
    Py_RETURN_NONE;
  return released([&] { return NORMLAB_OP("dyt", DytFwdSig).call(x, alpha, weight, bias); });
  END_HANDLE_TH_ERRORS
}

template <PyObject* (*front)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(front));
}

PyMethodDef methods[] = {
    {"layer_norm", fastcall<layer_norm_front>(), METH_FASTCALL,
     "layer_norm(input, normalized_shape, weight, bias, eps) -> y, or None for a call not plainly served"},
    {"add_layer_norm", fastcall<add_layer_norm_front>(), METH_FASTCALL,
     "add_layer_norm(input, residual, normalized_shape, weight, bias, eps) -> (y, s), or None"},
    {"rms_norm", fastcall<rms_norm_front>(), METH_FASTCALL,
     "rms_norm(input, normalized_shape, weight, eps, casting, offset, bias) -> y, or None"},
    {"add_rms_norm", fastcall<add_rms_norm_front>(), METH_FASTCALL,
     "add_rms_norm(input, residual, normalized_shape, weight, eps, casting, offset) -> (y, s), or None"},
    {"dyt", fastcall<dyt_front>(), METH_FASTCALL, "dyt(input, alpha, weight, bias) -> y, or None"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace normlab::cpu

// An importable module (normlab.kernels.cpu._C): importing it runs the operators' registrations (ops.cpp) and
// gives the fronts.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, normlab::cpu::methods};
  return PyModule_Create(&module);
}
