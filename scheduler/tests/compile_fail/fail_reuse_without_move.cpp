// Transitions consume their input: passing an lvalue (keeping the old state alive) does not compile.
// expect-error: use of deleted function
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
Finished illegal(Decoding d) { return finish(d, FinishReason::kLength); }
