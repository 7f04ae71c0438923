// Control: every legal transition compiles (if this fails, the fail_* results mean nothing).
#include "tokenspeed/request.hpp"
using namespace tokenspeed;
Decoding legal_path(Waiting w, PageList pages) {
  Prefilling p = admit(std::move(w), std::move(pages), 0, 0);
  (void)p.pages();
  return start_decoding(std::move(p));
}
Finished legal_finish(Decoding d) {
  (void)d.pages();
  return finish(std::move(d), FinishReason::kLength);
}
Waiting legal_preempt(Decoding d) { return preempt(std::move(d)); }
Finished legal_abort(Waiting w) { return abort(std::move(w)); }
