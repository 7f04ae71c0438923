// A finished request owns no pages: there is nothing to touch.
// expect-error: no member named .pages.
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
int32_t illegal(const Finished& f) { return f.pages()[0]; }
