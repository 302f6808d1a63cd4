// The operators as C++ calls them through the dispatcher: their signatures and a typed handle to each.
// Shared by the autograd nodes (ops.cpp) and the Python fronts (front.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace normlab::cpu {

using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

// A typed handle to one of this library's ops, looked up once.
#define NORMLAB_OP(name, sig) \
  ([]() -> auto& { static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("normlab::" name, "").typed<sig>(); return op; }())

using RmsFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, double, c10::string_view, double, int64_t,
                                             const OptTensor&);
using RmsBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                     double, int64_t, const OptTensor&, bool, bool);
using AddRmsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double,
                                                     c10::string_view, double, int64_t, at::ScalarType);
using LnFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double);
using LnBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                    const Tensor&, const OptTensor&, bool, bool);
using AddLnSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                            const OptTensor&, double, at::ScalarType);
using DytFwdSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&);
using DytTrainSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&);
using DytBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const OptTensor&, bool, bool, const OptTensor&);

}  // namespace normlab::cpu
