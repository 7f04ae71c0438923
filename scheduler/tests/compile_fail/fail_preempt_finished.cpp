// Preempting a finished request is meaningless: no preempt(Finished).
// expect-error: no matching function
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
Waiting illegal(Finished f) { return preempt(std::move(f)); }
