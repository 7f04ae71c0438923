#include "tokenspeed/scheduler.hpp"

#include <algorithm>
#include <bit>
#include <limits>

namespace tokenspeed {
namespace {

[[noreturn]] void fail(ErrorCode code, const std::string& what) { throw Error(code, what); }

constexpr int32_t kMaxBatchSize = 1 << 20;  // rows are preallocated: refuse absurd sizes up front

inline int32_t ceil_div(int64_t a, int64_t b) { return static_cast<int32_t>((a + b - 1) / b); }

}  // namespace

// Page arithmetic on the hot path: shifts when page_size is a power of two (the usual case),
// because three 64-bit divisions per request per step were a third of a 1024-decode step.
int32_t PageMath::pages_for(int64_t tokens) const noexcept {
  return shift >= 0 ? static_cast<int32_t>((tokens + size - 1) >> shift) : ceil_div(tokens, size);
}
int32_t PageMath::full_pages(int64_t tokens) const noexcept {
  return shift >= 0 ? static_cast<int32_t>(tokens >> shift) : static_cast<int32_t>(tokens / size);
}

namespace {

template <class T>
void append_all(std::vector<int32_t>& arena, const std::vector<T>& v) {
  arena.insert(arena.end(), v.begin(), v.end());
}

}  // namespace

void Plan::clear() {
  for (auto* v : {&req_ids, &rows, &query_start, &context_lens, &sample, &draft_slots, &input_tokens,
                  &positions, &truncate_rows, &truncate_lens, &new_rows, &new_row_reqs,
                  &append_rows, &append_slots, &append_pages})
    v->clear();
  query_start.push_back(0);
}

void Plan::pack() {
  arena.clear();
  for (auto* v : {&req_ids, &rows, &query_start, &context_lens, &sample, &draft_slots, &input_tokens,
                  &positions, &truncate_rows, &truncate_lens, &new_rows, &new_row_reqs,
                  &append_rows, &append_slots, &append_pages})
    append_all(arena, *v);
}

// Runs in the member-initializer list, before any pool memory is allocated.
static const Config& validated(const Config& c) {
  if (c.page_size < 1 || c.num_pages < 1 || c.max_batch_tokens < 1 || c.max_batch_size < 1 ||
      c.num_draft_slots < 0)
    fail(ErrorCode::kInvalidArgument,
         "config: page_size, num_pages, max_batch_tokens, max_batch_size must be >= 1 and "
         "num_draft_slots >= 0");
  if (static_cast<int64_t>(c.page_size) * c.num_pages > std::numeric_limits<int32_t>::max())
    fail(ErrorCode::kInvalidArgument, "config: page_size * num_pages exceeds 2^31 - 1 tokens");
  if (c.max_batch_size > kMaxBatchSize)
    fail(ErrorCode::kInvalidArgument, "config: max_batch_size must be <= " + std::to_string(kMaxBatchSize));
  if (c.max_batch_tokens < 1 + c.num_draft_slots)
    fail(ErrorCode::kInvalidArgument, "config: max_batch_tokens must be >= 1 + num_draft_slots");
  return c;
}

Scheduler::Scheduler(const Config& c)
    : config_(validated(c)), pool_(config_.num_pages), cache_(pool_, config_.page_size) {
  for (int32_t r = c.max_batch_size - 1; r >= 0; --r) free_rows_.push_back(r);
  page_math_.size = c.page_size;
  page_math_.shift = std::has_single_bit(static_cast<uint32_t>(c.page_size)) ? std::countr_zero(static_cast<uint32_t>(c.page_size)) : -1;
  plan_.clear();
}

int32_t Scheduler::slot_of(int32_t req_id) const {
  auto it = id_to_slot_.find(req_id);
  if (it == id_to_slot_.end())
    fail(ErrorCode::kUnknownRequest,
         "unknown request id " + std::to_string(req_id) + " (never submitted, finished or aborted)");
  return it->second;
}

int32_t Scheduler::submit(std::span<const int32_t> prompt, int32_t max_new_tokens,
                          std::span<const int32_t> stop_ids) {
  if (prompt.empty()) fail(ErrorCode::kInvalidArgument, "submit: empty prompt");
  if (max_new_tokens < 1)
    fail(ErrorCode::kInvalidArgument, "submit: max_new_tokens must be >= 1, got " + std::to_string(max_new_tokens));
  for (int32_t t : prompt)
    if (t < 0) fail(ErrorCode::kInvalidArgument, "submit: negative token id " + std::to_string(t) + " in prompt");
  const int64_t worst = static_cast<int64_t>(prompt.size()) + max_new_tokens + config_.num_draft_slots;
  const int64_t capacity = static_cast<int64_t>(config_.num_pages) * config_.page_size;
  if (worst > capacity)
    fail(ErrorCode::kCapacity, "submit: prompt (" + std::to_string(prompt.size()) + ") + max_new_tokens (" +
                                   std::to_string(max_new_tokens) + ") + draft slots exceeds the KV pool (" +
                                   std::to_string(capacity) + " tokens)");
  if (next_id_ == std::numeric_limits<int32_t>::max()) fail(ErrorCode::kCapacity, "submit: request ids exhausted");
  RequestCore core;
  core.id = next_id_++;
  // Room for a typical reply without growth, but never max_new_tokens blindly (it may be huge).
  core.tokens.reserve(prompt.size() + std::min(max_new_tokens, 1024) + 1);
  core.tokens.assign(prompt.begin(), prompt.end());
  core.prompt_len = static_cast<int32_t>(prompt.size());
  core.max_new_tokens = max_new_tokens;
  core.stop_ids.assign(stop_ids.begin(), stop_ids.end());
  int32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = static_cast<int32_t>(slots_.size());
    slots_.emplace_back();
  }
  slots_[slot].id = core.id;
  id_to_slot_.emplace(core.id, slot);
  slots_[slot].state.emplace<Waiting>(std::move(core));
  waiting_.push_back(slot);
  return slots_[slot].id;
}

void Scheduler::release_row(int32_t row) {
  pending_truncate_rows_.push_back(row);
  pending_truncate_lens_.push_back(0);
  free_rows_.push_back(row);
}

void Scheduler::remove_slot(int32_t slot) {
  id_to_slot_.erase(slots_[slot].id);
  slots_[slot].id = -1;
  slots_[slot].state.emplace<std::monostate>();
  free_slots_.push_back(slot);
}

void Scheduler::abort(int32_t req_id) {
  const int32_t slot = slot_of(req_id);
  LiveState& st = slots_[slot].state;
  if (std::holds_alternative<Waiting>(st)) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), slot));
    (void)tokenspeed::abort(std::move(std::get<Waiting>(st)));
  } else {
    running_.erase(std::find(running_.begin(), running_.end(), slot));
    if (auto* p = std::get_if<Prefilling>(&st)) {
      release_row(p->body().row);
      (void)tokenspeed::abort(std::move(*p));
    } else {
      auto& d = std::get<Decoding>(st);
      release_row(d.body().row);
      (void)tokenspeed::abort(std::move(d));
    }
  }
  remove_slot(slot);
}

void Scheduler::grow_pages(RunningBody& body, int32_t num_tokens) {
  const int32_t need = page_math_.pages_for(num_tokens) - static_cast<int32_t>(body.pages.size());
  if (need <= 0) return;
  const std::size_t first = body.pages.size();
  cache_.allocate(need, body.pages);
  for (std::size_t i = first; i < body.pages.size(); ++i) {
    plan_.append_rows.push_back(body.row);
    plan_.append_slots.push_back(static_cast<int32_t>(i));
    plan_.append_pages.push_back(body.pages[i]);
  }
}

void Scheduler::emit_entry(int32_t slot, const RunningBody& body, int32_t query_len, int32_t draft_slots, bool sample) {
  plan_slots_.push_back(slot);
  plan_.req_ids.push_back(body.core.id);
  plan_.rows.push_back(body.row);
  plan_.context_lens.push_back(body.num_computed);
  plan_.sample.push_back(sample ? 1 : 0);
  plan_.draft_slots.push_back(draft_slots);
  plan_.query_start.push_back(plan_.query_start.back() + query_len);
  const int32_t real = query_len - draft_slots;
  const int32_t* src = body.core.tokens.data() + body.num_computed;
  if (query_len == 1) {  // the common decode: skip the generic range inserts
    plan_.input_tokens.push_back(*src);
    plan_.positions.push_back(body.num_computed);
  } else {
    plan_.input_tokens.insert(plan_.input_tokens.end(), src, src + real);
    plan_.input_tokens.insert(plan_.input_tokens.end(), draft_slots, -1);
    for (int32_t i = 0; i < query_len; ++i) plan_.positions.push_back(body.num_computed + i);
  }
  stats_.computed_tokens += query_len;
  ++num_scheduled_;
}

void Scheduler::preempt_slot(int32_t slot) {
  LiveState& st = slots_[slot].state;
  if (auto* p = std::get_if<Prefilling>(&st)) {
    release_row(p->body().row);
    st = preempt(std::move(*p));
  } else {
    auto& d = std::get<Decoding>(st);
    release_row(d.body().row);
    st = preempt(std::move(d));
  }
  waiting_.push_front(slot);
  ++stats_.preemptions;
}

bool Scheduler::schedule_decodes(int32_t& budget) {
  const int32_t k = config_.num_draft_slots;
  for (std::size_t i = 0; i < running_.size(); ++i) {
    const int32_t slot = running_[i];
    auto* d = std::get_if<Decoding>(&slots_[slot].state);
    if (!d) continue;
    if (num_scheduled_ == config_.max_batch_size || budget < 1 + k) break;
    RunningBody& body = d->body();
    const int32_t need_tokens = body.num_computed + 1 + k;
    const int32_t need_pages = page_math_.pages_for(need_tokens) - static_cast<int32_t>(body.pages.size());
    while (need_pages > pool_.available()) {
      // Victim: the most recently admitted running request; never one already in this plan,
      // because decodes are visited front to back and victims come off the back.
      const int32_t victim = running_.back();
      running_.pop_back();
      preempt_slot(victim);
      if (victim == slot) return false;
    }
    grow_pages(body, need_tokens);
    emit_entry(slot, body, 1 + k, k, true);
    budget -= 1 + k;
  }
  return true;
}

void Scheduler::schedule_prefills(int32_t& budget) {
  const int32_t ps = config_.page_size;
  for (const int32_t slot : running_) {
    auto* p = std::get_if<Prefilling>(&slots_[slot].state);
    if (!p) continue;
    if (num_scheduled_ == config_.max_batch_size || budget == 0) break;
    RunningBody& body = p->body();
    int32_t chunk = std::min(p->remaining(), budget);
    const int32_t have = static_cast<int32_t>(body.pages.size());
    if (ceil_div(body.num_computed + chunk, ps) - have > pool_.available()) {
      chunk = static_cast<int32_t>(std::min<int64_t>(
          chunk, static_cast<int64_t>(have + pool_.available()) * ps - body.num_computed));
      if (chunk <= 0) continue;
    }
    grow_pages(body, body.num_computed + chunk);
    emit_entry(slot, body, chunk, 0, chunk == p->remaining());
    budget -= chunk;
  }
}

void Scheduler::admit_waiting(int32_t& budget) {
  const int32_t ps = config_.page_size;
  while (!waiting_.empty() && num_scheduled_ < config_.max_batch_size && budget > 0 && !free_rows_.empty()) {
    // Nothing free and nothing evictable: the head is blocked whatever it matches. Checking this
    // first keeps a blocked queue at O(1) per step (no hashing of the head's prompt).
    if (pool_.available() == 0) break;
    const int32_t slot = waiting_.front();
    Waiting& w = std::get<Waiting>(slots_[slot].state);
    const auto& tokens = w.core().tokens;
    const int32_t total = static_cast<int32_t>(tokens.size());
    // The last token is always recomputed: its logits are what the engine samples from.
    match_scratch_.clear();
    const int32_t matched = cache_.match(tokens.data(), (total - 1) / ps, match_scratch_);
    const int32_t matched_tokens = matched * ps;
    int32_t idle_in_match = 0;
    for (int32_t page : match_scratch_) idle_in_match += pool_.refcount(page) == 0;
    const int32_t avail = pool_.available() - idle_in_match;
    int32_t chunk = std::min(total - matched_tokens, budget);
    if (ceil_div(matched_tokens + chunk, ps) - matched > avail) {
      chunk = static_cast<int32_t>(std::min<int64_t>(chunk, static_cast<int64_t>(avail) * ps));
      if (chunk <= 0) break;  // blocked head: FCFS, nobody overtakes it
    }
    waiting_.pop_front();
    PageList pages(pool_);
    for (int32_t page : match_scratch_) {
      pool_.ref(page);
      pages.adopt(page);
    }
    RequestCore& core = w.core();
    if (!core.admitted_once) {
      core.admitted_once = true;
      stats_.prompt_tokens += core.prompt_len;
      stats_.cached_prompt_tokens += matched_tokens;
    }
    const int32_t row = free_rows_.back();
    free_rows_.pop_back();
    LiveState& st = slots_[slot].state;
    st = admit(std::move(w), std::move(pages), matched_tokens, row);
    Prefilling& p = std::get<Prefilling>(st);
    RunningBody& body = p.body();
    if (body.chain_parent >= 0) body.chain_generation = cache_.generation(body.chain_parent);
    plan_.new_rows.push_back(row);
    plan_.new_row_reqs.push_back(body.core.id);
    for (int32_t i = 0; i < matched; ++i) {
      plan_.append_rows.push_back(row);
      plan_.append_slots.push_back(i);
      plan_.append_pages.push_back(body.pages[i]);
    }
    grow_pages(body, matched_tokens + chunk);
    emit_entry(slot, body, chunk, 0, chunk == p.remaining());
    running_.push_back(slot);
    budget -= chunk;
  }
}

const Plan& Scheduler::step() {
  if (awaiting_commit_ && plan_.num_entries() > 0)  // an empty plan needs no commit
    fail(ErrorCode::kProtocol, "step() called again before commit() of step " + std::to_string(plan_.step_id));
  plan_.clear();
  plan_.step_id = next_step_id_++;
  num_scheduled_ = 0;
  plan_slots_.clear();
  int32_t budget = config_.max_batch_tokens;
  if (schedule_decodes(budget)) {
    schedule_prefills(budget);
    admit_waiting(budget);
  }
  // Truncations gathered since the last plan (commits, aborts, this step's preemptions) go first.
  plan_.truncate_rows.swap(pending_truncate_rows_);
  plan_.truncate_lens.swap(pending_truncate_lens_);
  pending_truncate_rows_.clear();
  pending_truncate_lens_.clear();
  plan_.pack();
  ++stats_.steps;
  awaiting_commit_ = true;
  return plan_;
}

int32_t Scheduler::append_tokens(RunningBody& body, const int32_t* tokens, int32_t n) {
  RequestCore& core = body.core;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    core.tokens.push_back(t);
    ++core.num_output;
    for (int32_t s : core.stop_ids)
      if (s == t) return static_cast<int32_t>(FinishReason::kStopToken);
    if (core.num_output >= core.max_new_tokens) return static_cast<int32_t>(FinishReason::kLength);
  }
  return 0;
}

void Scheduler::offer_full_pages(RunningBody& body) {
  const int32_t ps = config_.page_size;
  const int32_t full = page_math_.full_pages(body.num_computed);
  while (body.num_cached_pages < full && !body.chain_broken) {
    const int32_t parent = body.chain_parent;
    if (parent >= 0 && (!pool_.is_cached(parent) || cache_.generation(parent) != body.chain_generation)) {
      body.chain_broken = true;  // an ancestor was evicted meanwhile: the rest cannot be linked
      break;
    }
    const int32_t j = body.num_cached_pages;
    const int32_t canonical = cache_.insert(parent, body.core.tokens.data() + static_cast<std::size_t>(j) * ps, body.pages[j]);
    if (canonical < 0) {
      body.chain_broken = true;
      break;
    }
    body.chain_parent = canonical;
    body.chain_generation = cache_.generation(canonical);
    body.num_cached_pages = j + 1;
  }
}

const FinishedList& Scheduler::commit(const CommitInput& in) {
  if (!awaiting_commit_)
    fail(ErrorCode::kProtocol, "commit() without a pending plan: step() was not called, or step " +
                                   std::to_string(plan_.step_id) + " was already committed");
  if (in.step_id != plan_.step_id)
    fail(ErrorCode::kProtocol, "commit() for step " + std::to_string(in.step_id) + " but the pending plan is step " +
                                   std::to_string(plan_.step_id));
  const int32_t n = plan_.num_entries();
  if (static_cast<int64_t>(in.req_ids.size()) != n || static_cast<int64_t>(in.num_sampled.size()) != n ||
      (!in.finish.empty() && static_cast<int64_t>(in.finish.size()) != n))
    fail(ErrorCode::kInvalidArgument, "commit(): expected " + std::to_string(n) + " entries (one per plan entry), got " +
                                          std::to_string(in.req_ids.size()));
  int64_t total = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (in.req_ids[i] != plan_.req_ids[i])
      fail(ErrorCode::kInvalidArgument, "commit(): entry " + std::to_string(i) + " is request " +
                                            std::to_string(in.req_ids[i]) + " but the plan has request " +
                                            std::to_string(plan_.req_ids[i]));
    const int32_t ns = in.num_sampled[i];
    const int32_t lo = plan_.sample[i] ? 1 : 0, hi = plan_.sample[i] ? 1 + plan_.draft_slots[i] : 0;
    if (ns < lo || ns > hi)
      fail(ErrorCode::kInvalidArgument, "commit(): request " + std::to_string(in.req_ids[i]) + " num_sampled=" +
                                            std::to_string(ns) + " out of range [" + std::to_string(lo) + ", " +
                                            std::to_string(hi) + "]");
    total += ns;
  }
  if (total != static_cast<int64_t>(in.tokens.size()))
    fail(ErrorCode::kInvalidArgument, "commit(): sum(num_sampled)=" + std::to_string(total) + " but " +
                                          std::to_string(in.tokens.size()) + " tokens given");
  for (int32_t t : in.tokens)
    if (t < 0) fail(ErrorCode::kInvalidArgument, "commit(): negative token id " + std::to_string(t));

  // Validated: from here on nothing fails, so a rejected commit changes nothing.
  awaiting_commit_ = false;
  finished_.ids.clear();
  finished_.reasons.clear();
  bool any_finished = false;
  int64_t offset = 0;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t slot = plan_slots_[i];
    const int32_t ns = in.num_sampled[i];
    const int32_t* toks = in.tokens.data() + offset;
    offset += ns;
    if (slots_[slot].id != plan_.req_ids[i]) continue;  // aborted after step()
    LiveState& st = slots_[slot].state;
    const int32_t query_len = plan_.query_start[i + 1] - plan_.query_start[i];
    int32_t reason = 0;
    if (auto* p = std::get_if<Prefilling>(&st)) {
      p->body().num_computed += query_len;
      if (ns == 0) {  // a non-final prefill chunk
        offer_full_pages(p->body());
        if (!in.finish.empty() && in.finish[i]) {
          release_row(p->body().row);
          Finished f = finish(std::move(*p), FinishReason::kEngine);
          finished_.ids.push_back(f.id());
          finished_.reasons.push_back(static_cast<int32_t>(f.reason()));
          remove_slot(slot);
          any_finished = true;
        }
        continue;
      }
      reason = append_tokens(p->body(), toks, ns);
      st = start_decoding(std::move(*p));
    } else {
      RunningBody& b = std::get<Decoding>(st).body();
      reason = append_tokens(b, toks, ns);
      b.num_computed = std::min<int32_t>(b.num_computed + ns, static_cast<int32_t>(b.core.tokens.size()));
    }
    Decoding& d = std::get<Decoding>(st);
    RunningBody& body = d.body();
    if (reason == 0 && !in.finish.empty() && in.finish[i]) reason = static_cast<int32_t>(FinishReason::kEngine);
    offer_full_pages(body);
    if (reason != 0) {
      release_row(body.row);
      Finished f = finish(std::move(d), static_cast<FinishReason>(reason));
      finished_.ids.push_back(f.id());
      finished_.reasons.push_back(reason);
      remove_slot(slot);
      any_finished = true;
      continue;
    }
    // Rejected drafts roll back logically: num_computed stops before them, so their KV is never
    // cached and gets overwritten next step. Pages beyond what the next step's 1 + k query tokens
    // need are released (keeping exactly those avoids freeing and re-allocating every step).
    const auto keep = static_cast<std::size_t>(
        page_math_.pages_for(static_cast<int64_t>(body.core.tokens.size()) + config_.num_draft_slots));
    if (body.pages.size() > keep) {
      body.pages.truncate(keep);
      pending_truncate_rows_.push_back(body.row);
      pending_truncate_lens_.push_back(static_cast<int32_t>(keep));
    }
  }
  if (any_finished) {
    std::erase_if(running_, [this](int32_t slot) { return slots_[slot].id < 0; });
  }
  return finished_;
}

int32_t Scheduler::match_prefix(std::span<const int32_t> tokens) const {
  std::vector<int32_t> pages;
  const int32_t ps = config_.page_size;
  if (tokens.empty()) return 0;
  return cache_.match(tokens.data(), (static_cast<int32_t>(tokens.size()) - 1) / ps, pages) * ps;
}

std::string Scheduler::check_invariants() const {
  if (std::string e = pool_.check(); !e.empty()) return "page pool: " + e;
  if (std::string e = cache_.check(); !e.empty()) return "prefix cache: " + e;
  // Refcounts balance: each page's refcount equals the number of live PageLists holding it.
  std::vector<int32_t> refs(pool_.num_pages(), 0);
  std::vector<uint8_t> row_used(config_.max_batch_size, 0);
  const int32_t ps = config_.page_size;
  for (int32_t slot : running_) {
    const RunningBody* b = nullptr;
    if (auto* p = std::get_if<Prefilling>(&slots_[slot].state)) b = &p->body();
    else if (auto* d = std::get_if<Decoding>(&slots_[slot].state)) b = &d->body();
    else return "running list holds a request that is not running (slot " + std::to_string(slot) + ")";
    for (int32_t page : b->pages.pages()) ++refs[page];
    if (b->row < 0 || b->row >= config_.max_batch_size || row_used[b->row]++)
      return "request " + std::to_string(b->core.id) + " has an invalid or shared row";
    if (static_cast<int64_t>(b->pages.size()) * ps < b->num_computed)
      return "request " + std::to_string(b->core.id) + " has KV for tokens without pages";
    if (b->num_computed > static_cast<int32_t>(b->core.tokens.size()))
      return "request " + std::to_string(b->core.id) + " computed past its tokens";
    if (static_cast<int64_t>(b->pages.size()) > ceil_div(static_cast<int64_t>(b->core.tokens.size()) + config_.num_draft_slots + 1, ps))
      return "request " + std::to_string(b->core.id) + " holds more pages than it can use";
  }
  for (int32_t p = 0; p < pool_.num_pages(); ++p)
    if (refs[p] != pool_.refcount(p))
      return "page " + std::to_string(p) + " refcount " + std::to_string(pool_.refcount(p)) + " but " +
             std::to_string(refs[p]) + " holders";
  for (int32_t slot : waiting_)
    if (!std::holds_alternative<Waiting>(slots_[slot].state))
      return "waiting queue holds a request that is not waiting (slot " + std::to_string(slot) + ")";
  if (waiting_.size() + running_.size() != id_to_slot_.size()) return "live request count mismatch";
  if (free_rows_.size() + running_.size() != static_cast<std::size_t>(config_.max_batch_size))
    return "row accounting mismatch";
  return {};
}

}  // namespace tokenspeed
