// Shared helpers of the native modules: argument checks that raise Python ValueError with clear words.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace metamoe {

// Thrown for bad arguments; pybind11 maps std::invalid_argument to ValueError.
template <typename... Args>
[[noreturn]] inline void fail(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

}  // namespace metamoe

#define METAMOE_CHECK(cond, ...)                 \
  do {                                           \
    if (!(cond)) ::metamoe::fail(__VA_ARGS__);   \
  } while (0)
