// request.hpp: the request lifecycle as type-states.
//
//   Waiting --admit--> Prefilling --start_decoding--> Decoding --finish--> Finished
//      ^                   |                             |
//      +-----preempt-------+-------------preempt---------+      abort: any live state -> Finished
//
// Each state is its own move-only type owning exactly what that state may hold:
//   Waiting     the token history (prompt + outputs so far); no pages, no row.
//   Prefilling  the token history, a PageList, a page-table row, prefix-cache chain state.
//   Decoding    same as Prefilling; the prompt is fully in KV, one sampled token pending.
//   Finished    id, reason and output count only: no pages, nothing to touch.
// Transitions are free functions taking the old state by value (callers must std::move it) and
// returning the new one ([[nodiscard]]): the old state is consumed, and whatever it owned that the
// new state may not hold (pages) is released when the parameter dies. There is no function from Waiting to Decoding,
// none from Finished to anything, and Finished has no pages(), so those mistakes do not compile.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "tokenspeed/page_pool.hpp"

namespace tokenspeed {

enum class FinishReason : int32_t { kStopToken = 1, kLength = 2, kEngine = 3, kAborted = 4 };

// What every live state carries: the request's identity, limits and token history.
struct RequestCore {
  int32_t id = -1;
  std::vector<int32_t> tokens;  // prompt followed by accepted outputs
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;
  std::vector<int32_t> stop_ids;
  int32_t num_output = 0;
  bool admitted_once = false;  // prefix-hit statistics count the first admission only
};

// The body shared by the two running states; reachable only through them.
struct RunningBody {
  RequestCore core;
  PageList pages;            // pages[i] holds KV for tokens [i*page_size, (i+1)*page_size)
  int32_t row = -1;          // page-table row in the execution plane
  int32_t num_computed = 0;  // tokens whose KV is written and valid
  int32_t num_cached_pages = 0;  // leading pages already offered to the prefix cache
  int32_t chain_parent = -1;     // canonical cached page of the last offered block (-1 root)
  uint32_t chain_generation = 0; // its generation when linked; a mismatch breaks the chain
  bool chain_broken = false;
};

class Waiting {
 public:
  explicit Waiting(RequestCore core) : core_(std::move(core)) {}
  Waiting(Waiting&&) noexcept = default;
  Waiting& operator=(Waiting&&) noexcept = default;
  Waiting(const Waiting&) = delete;
  Waiting& operator=(const Waiting&) = delete;
  [[nodiscard]] const RequestCore& core() const noexcept { return core_; }
  [[nodiscard]] RequestCore& core() noexcept { return core_; }

 private:
  RequestCore core_;
};

class Prefilling {
 public:
  Prefilling(Prefilling&&) noexcept = default;
  Prefilling& operator=(Prefilling&&) noexcept = default;
  Prefilling(const Prefilling&) = delete;
  Prefilling& operator=(const Prefilling&) = delete;
  [[nodiscard]] RunningBody& body() noexcept { return body_; }
  [[nodiscard]] const RunningBody& body() const noexcept { return body_; }
  [[nodiscard]] const PageList& pages() const noexcept { return body_.pages; }
  // Tokens still to prefill (the whole history, minus what is in KV).
  [[nodiscard]] int32_t remaining() const noexcept {
    return static_cast<int32_t>(body_.core.tokens.size()) - body_.num_computed;
  }

 private:
  explicit Prefilling(RunningBody body) : body_(std::move(body)) {}
  RunningBody body_;
  friend Prefilling admit(Waiting, PageList, int32_t, int32_t);
};

class Decoding {
 public:
  Decoding(Decoding&&) noexcept = default;
  Decoding& operator=(Decoding&&) noexcept = default;
  Decoding(const Decoding&) = delete;
  Decoding& operator=(const Decoding&) = delete;
  [[nodiscard]] RunningBody& body() noexcept { return body_; }
  [[nodiscard]] const RunningBody& body() const noexcept { return body_; }
  [[nodiscard]] const PageList& pages() const noexcept { return body_.pages; }

 private:
  explicit Decoding(RunningBody body) : body_(std::move(body)) {}
  RunningBody body_;
  friend Decoding start_decoding(Prefilling);
};

class Finished {
 public:
  Finished(Finished&&) noexcept = default;
  Finished& operator=(Finished&&) noexcept = default;
  Finished(const Finished&) = delete;
  Finished& operator=(const Finished&) = delete;
  [[nodiscard]] int32_t id() const noexcept { return id_; }
  [[nodiscard]] FinishReason reason() const noexcept { return reason_; }
  [[nodiscard]] int32_t num_output() const noexcept { return num_output_; }

 private:
  Finished(int32_t id, FinishReason reason, int32_t num_output)
      : id_(id), reason_(reason), num_output_(num_output) {}
  int32_t id_;
  FinishReason reason_;
  int32_t num_output_;
  friend Finished finish(Decoding, FinishReason);
  friend Finished finish(Prefilling, FinishReason);
  friend Finished abort(Waiting);
};

// Waiting -> Prefilling: `matched` holds references on the cached prefix pages already counted
// as computed (matched_tokens = matched.size() * page_size).
[[nodiscard]] inline Prefilling admit(Waiting w, PageList matched, int32_t matched_tokens, int32_t row) {
  RunningBody body{std::move(w.core()), std::move(matched), row, matched_tokens};
  body.num_cached_pages = static_cast<int32_t>(body.pages.size());
  body.chain_parent = body.pages.size() ? body.pages[body.pages.size() - 1] : -1;
  return Prefilling(std::move(body));
}

// Prefilling -> Decoding once the whole history is in KV and the first token was appended.
[[nodiscard]] inline Decoding start_decoding(Prefilling p) {
  if (p.body().num_computed + 1 != static_cast<int32_t>(p.body().core.tokens.size()))
    throw std::logic_error("start_decoding: prefill not complete");
  return Decoding(std::move(p.body()));
}

// Running -> Waiting: pages are released (full pages stay in the prefix cache), the token
// history is kept so that re-admission recomputes it (mostly as cache hits).
[[nodiscard]] inline Waiting preempt(Prefilling p) { return Waiting(std::move(p.body().core)); }
[[nodiscard]] inline Waiting preempt(Decoding d) { return Waiting(std::move(d.body().core)); }

[[nodiscard]] inline Finished finish(Decoding d, FinishReason reason) {
  return Finished(d.body().core.id, reason, d.body().core.num_output);
}
[[nodiscard]] inline Finished finish(Prefilling p, FinishReason reason) {
  return Finished(p.body().core.id, reason, p.body().core.num_output);
}
[[nodiscard]] inline Finished abort(Waiting w) {
  return Finished(w.core().id, FinishReason::kAborted, w.core().num_output);
}
[[nodiscard]] inline Finished abort(Prefilling p) { return finish(std::move(p), FinishReason::kAborted); }
[[nodiscard]] inline Finished abort(Decoding d) { return finish(std::move(d), FinishReason::kAborted); }

}  // namespace tokenspeed
