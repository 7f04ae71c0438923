// [[nodiscard]]: dropping the state a transition returns is an error under -Werror.
// expect-error: nodiscard
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
void illegal(Decoding d) { finish(std::move(d), FinishReason::kLength); }
