// A waiting request owns no pages either.
// expect-error: no member named .pages.
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
int32_t illegal(const Waiting& w) { return w.pages()[0]; }
