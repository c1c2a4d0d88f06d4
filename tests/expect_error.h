// expect_error: the test fails unless fn throws a c10::Error whose message contains fragment.
#pragma once

#include <gtest/gtest.h>

#include <c10/util/Exception.h>

#include <functional>
#include <string>

namespace lowbit::testing {

inline void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning \"" << fragment << "\"";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(fragment), std::string::npos)
        << "message was: " << e.what_without_backtrace();
  }
}

}  // namespace lowbit::testing
