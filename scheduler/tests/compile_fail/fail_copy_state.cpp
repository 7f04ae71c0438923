// States are move-only: a copy would duplicate page ownership.
// expect-error: use of deleted function
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
void illegal(Decoding& d) { Decoding copy = d; (void)copy; }
