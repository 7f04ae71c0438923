// scheduler.hpp: continuous batching over the request type-states, the page pool and the
// prefix cache. One step protocol: step() -> Plan, then commit(results) for that plan.
//
// Policy (mirrored exactly by tests/scheduler/reference_scheduler.py):
//   1. decodes first, in admission order: each needs 1 + k tokens of budget and pages for them;
//      when pages run out, preempt the most recently admitted running request (recompute);
//   2. running prefills continue, in admission order, chunked to the remaining budget;
//   3. waiting requests are admitted FCFS (preempted ones first); a blocked head stops admission.
// Owns: every live request (in its state), the pool, the cache, the plan buffers.
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "tokenspeed/page_pool.hpp"
#include "tokenspeed/prefix_cache.hpp"
#include "tokenspeed/request.hpp"

namespace tokenspeed {

struct Config {
  int32_t page_size = 64;
  int32_t num_pages = 4096;
  int32_t max_batch_tokens = 8192;
  int32_t max_batch_size = 256;
  int32_t num_draft_slots = 0;
};

enum class ErrorCode : int32_t {
  kInvalidArgument = 1, kUnknownRequest = 2, kProtocol = 3, kCapacity = 4, kInvariant = 5,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  [[nodiscard]] ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// A step's plan. Layout documented in tokenspeed_scheduler.h (ts_plan).
struct Plan {
  int64_t step_id = 0;
  std::vector<int32_t> req_ids, rows, query_start, context_lens, sample, draft_slots;
  std::vector<int32_t> input_tokens, positions;
  std::vector<int32_t> truncate_rows, truncate_lens;
  std::vector<int32_t> new_rows, new_row_reqs;
  std::vector<int32_t> append_rows, append_slots, append_pages;
  std::vector<int32_t> arena;  // all of the above, back to back, filled by pack()
  void clear();
  void pack();
  [[nodiscard]] int32_t num_entries() const noexcept { return static_cast<int32_t>(req_ids.size()); }
};

struct PageMath {
  int32_t size = 1;
  int32_t shift = -1;  // log2(size) when size is a power of two
  [[nodiscard]] int32_t pages_for(int64_t tokens) const noexcept;   // ceil(tokens / size)
  [[nodiscard]] int32_t full_pages(int64_t tokens) const noexcept;  // floor(tokens / size)
};

struct CommitInput {
  int64_t step_id = 0;
  std::span<const int32_t> req_ids, num_sampled, tokens;
  std::span<const uint8_t> finish;  // empty: no engine-forced finishes
};

struct FinishedList {
  std::vector<int32_t> ids, reasons;
};

struct Stats {
  int64_t steps = 0, preemptions = 0, prompt_tokens = 0, cached_prompt_tokens = 0,
          computed_tokens = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const Config& config);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  [[nodiscard]] int32_t submit(std::span<const int32_t> prompt, int32_t max_new_tokens,
                               std::span<const int32_t> stop_ids);
  void abort(int32_t req_id);
  [[nodiscard]] const Plan& step();
  [[nodiscard]] const FinishedList& commit(const CommitInput& input);
  [[nodiscard]] std::string check_invariants() const;  // empty when everything holds
  [[nodiscard]] int32_t match_prefix(std::span<const int32_t> tokens) const;

  [[nodiscard]] const Stats& stats() const noexcept { return stats_; }
  [[nodiscard]] const PagePool& pool() const noexcept { return pool_; }
  [[nodiscard]] int32_t num_waiting() const noexcept { return static_cast<int32_t>(waiting_.size()); }
  [[nodiscard]] int32_t num_running() const noexcept { return static_cast<int32_t>(running_.size()); }

 private:
  using LiveState = std::variant<std::monostate, Waiting, Prefilling, Decoding>;
  struct Slot {
    int32_t id = -1;
    LiveState state;
  };

  [[nodiscard]] int32_t slot_of(int32_t req_id) const;
  void grow_pages(RunningBody& body, int32_t num_tokens);  // allocate + emit appends
  void emit_entry(int32_t slot, const RunningBody& body, int32_t query_len, int32_t draft_slots, bool sample);
  void preempt_slot(int32_t slot);
  void release_row(int32_t row);
  void offer_full_pages(RunningBody& body);
  void remove_slot(int32_t slot);
  bool schedule_decodes(int32_t& budget);
  void schedule_prefills(int32_t& budget);
  void admit_waiting(int32_t& budget);
  // Appends accepted tokens; returns the finish reason or 0.
  int32_t append_tokens(RunningBody& body, const int32_t* tokens, int32_t n);

  Config config_;
  PageMath page_math_;
  PagePool pool_;
  PrefixCache cache_;
  std::vector<Slot> slots_;
  std::vector<int32_t> free_slots_;
  std::unordered_map<int32_t, int32_t> id_to_slot_;
  std::deque<int32_t> waiting_;  // slots, FCFS
  std::vector<int32_t> running_;  // slots, admission order
  std::vector<int32_t> free_rows_;
  std::vector<int32_t> pending_truncate_rows_, pending_truncate_lens_;
  std::vector<int32_t> plan_slots_;  // slot of each plan entry, for commit
  std::vector<int32_t> match_scratch_;
  Plan plan_;
  FinishedList finished_;
  Stats stats_;
  int32_t next_id_ = 0;
  int64_t next_step_id_ = 1;
  bool awaiting_commit_ = false;
  int32_t num_scheduled_ = 0;  // entries in the plan being built
};

}  // namespace tokenspeed
