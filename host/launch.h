// A kernel launch on the host: the kernel's parameters are read from an array of pointers to their
// values (cuLaunchKernel's kernelParams, what commkit/jit/host.py passes), then every fiber of the
// launch calls the kernel with them (runtime.h).
#pragma once

#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "host/runtime.h"

namespace commkit::host {

template <typename T>
T read_param(void* const* params, size_t index) {
    static_assert(std::is_trivially_copyable_v<T>, "kernel parameters are trivially copyable");
    T value;
    std::memcpy(&value, params[index], sizeof(T));
    return value;
}

template <typename... Args, size_t... I>
std::tuple<std::decay_t<Args>...> read_params(void* const* params, std::index_sequence<I...>) {
    return {read_param<std::decay_t<Args>>(params, I)...};
}

template <typename... Args>
int launch_kernel(void (*kernel)(Args...), const LaunchConfig& config, void* const* params, char* log,
                  size_t log_bytes) {
    using Params = std::tuple<std::decay_t<Args>...>;
    struct Call {
        void (*kernel)(Args...);
        Params params;
    };
    Call call{kernel, read_params<Args...>(params, std::index_sequence_for<Args...>{})};
    auto body = [](void* arg) {
        Call* c = static_cast<Call*>(arg);
        std::apply(c->kernel, c->params);
    };
    return launch(config, body, &call, log, log_bytes);
}

}  // namespace commkit::host
