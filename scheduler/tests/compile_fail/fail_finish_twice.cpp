// A finished request cannot be finished again: finish() takes a Decoding, not a Finished.
// expect-error: no matching function
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
Finished illegal(Decoding d) {
  Finished once = finish(std::move(d), FinishReason::kLength);
  return finish(std::move(once), FinishReason::kLength);
}
