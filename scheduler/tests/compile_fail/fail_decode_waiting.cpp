// A waiting request cannot start decoding: it has no pages and no KV.
// expect-error: could not convert|no matching function
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
Decoding illegal(Waiting w) { return start_decoding(std::move(w)); }
