// C++ unit tests for the scheduler core. No framework: each TEST is a function, CHECK aborts with
// file:line. Built and run from tests/scheduler/test_scheduler_cpp.py (plain and ASan+UBSan).
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tokenspeed/page_pool.hpp"
#include "tokenspeed/prefix_cache.hpp"
#include "tokenspeed/request.hpp"
#include "tokenspeed/scheduler.hpp"

using namespace tokenspeed;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)
#define CHECK_OK(text)                                                            \
  do {                                                                            \
    std::string t_ = (text);                                                      \
    if (!t_.empty()) {                                                            \
      std::fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, t_.c_str()); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

template <class F>
ErrorCode error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return static_cast<ErrorCode>(0);
}

static std::vector<int32_t> iota_tokens(int32_t n, int32_t start = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

// Runs steps, sampling `token` for every sampling entry, until `id` finishes; returns steps.
static int run_until_done(Scheduler& s, int32_t id, int32_t token = 7) {
  for (int n = 1; n < 100000; ++n) {
    const Plan& p = s.step();
    std::vector<int32_t> ns(p.sample.begin(), p.sample.end());
    std::vector<int32_t> toks(std::accumulate(ns.begin(), ns.end(), 0), token);
    std::vector<int32_t> ids = p.req_ids;
    const FinishedList& f = s.commit({p.step_id, ids, ns, toks, {}});
    CHECK_OK(s.check_invariants());
    for (int32_t fid : f.ids)
      if (fid == id) return n;
  }
  CHECK(false);
  return -1;
}

static void test_page_pool() {
  PagePool pool(4);
  CHECK(pool.free_count() == 4);
  {
    PageList a(pool);
    a.adopt(pool.pop_free());
    a.adopt(pool.pop_free());
    CHECK(a[0] == 0 && a[1] == 1);
    PageList b(pool);
    pool.ref(a[0]);
    b.adopt(a[0]);
    CHECK(pool.refcount(0) == 2);
    CHECK_OK(pool.check());
    PageList moved = std::move(a);
    CHECK(a.size() == 0 && moved.size() == 2);
  }
  CHECK(pool.free_count() == 4);
  CHECK_OK(pool.check());
}

static void test_prefix_cache_match_dedupe_evict() {
  PagePool pool(6);
  PrefixCache cache(pool, 2);
  const std::vector<int32_t> toks = {1, 2, 3, 4, 5, 6};
  PageList owner(pool);
  cache.allocate(3, owner);
  int32_t parent = -1;
  for (int j = 0; j < 3; ++j) parent = cache.insert(parent, &toks[2 * j], owner[j]);
  CHECK(parent == owner[2]);
  std::vector<int32_t> got;
  CHECK(cache.match(toks.data(), 3, got) == 3 && got[2] == owner[2]);
  // Same content offered again (a concurrent duplicate): the canonical page comes back.
  PageList dup(pool);
  cache.allocate(1, dup);
  CHECK(cache.insert(-1, &toks[0], dup[0]) == owner[0]);
  CHECK(!pool.is_cached(dup[0]));
  // Different second block: only the first page matches.
  const std::vector<int32_t> other = {1, 2, 9, 9};
  got.clear();
  CHECK(cache.match(other.data(), 2, got) == 1);
  owner.truncate(0);  // all three idle cached, leaf first on the LRU
  CHECK(pool.idle_cached_count() == 3);
  CHECK_OK(cache.check());
  // Allocating everything evicts; evicting the root uncaches its subtree.
  PageList big(pool);
  cache.allocate(5, big);
  CHECK(pool.idle_cached_count() == 0);
  got.clear();
  CHECK(cache.match(toks.data(), 3, got) == 0);
  CHECK(cache.evictions() >= 1);
  CHECK_OK(cache.check());
  CHECK_OK(pool.check());
}

static void test_lifecycle_and_prefix_reuse() {
  Scheduler s(Config{4, 64, 16, 8, 0});
  const int32_t a = s.submit(iota_tokens(30), 5, {});
  run_until_done(s, a);
  CHECK(s.stats().prompt_tokens == 30 && s.stats().cached_prompt_tokens == 0);
  // Next turn: previous prompt + reply (5 x token 7) + new message.
  std::vector<int32_t> turn2 = iota_tokens(30);
  turn2.insert(turn2.end(), 5, 7);
  turn2.push_back(100);
  turn2.push_back(101);
  const int32_t b = s.submit(turn2, 3, {});
  const Plan& p = s.step();
  // 30 + 5 tokens, of which 34 had KV (the last reply token never got computed): 8 full pages.
  CHECK(p.context_lens[0] == 32);
  CHECK(s.stats().cached_prompt_tokens == 32);
  CHECK(p.new_rows.size() == 1 && p.append_rows.size() == 10);
  std::vector<int32_t> ids = p.req_ids, ns(p.sample.begin(), p.sample.end());
  std::vector<int32_t> toks(ns[0], 1);
  (void)s.commit({p.step_id, ids, ns, toks, {}});
  run_until_done(s, b);
  CHECK(s.pool().free_count() + s.pool().idle_cached_count() == 64);
  CHECK_OK(s.check_invariants());
}

static void test_stop_token_and_errors() {
  Scheduler s(Config{4, 16, 64, 4, 0});
  const std::vector<int32_t> stops = {42};
  const int32_t a = s.submit(iota_tokens(5), 40, stops);
  const Plan& p = s.step();
  std::vector<int32_t> ids = p.req_ids, one = {1}, stop = {42};
  CHECK(error_of([&] { (void)s.step(); }) == ErrorCode::kProtocol);
  CHECK(error_of([&] { (void)s.commit({p.step_id, ids, one, {}, {}}); }) == ErrorCode::kInvalidArgument);
  std::vector<int32_t> wrong_ids = {a + 1};
  CHECK(error_of([&] { (void)s.commit({p.step_id, wrong_ids, one, stop, {}}); }) == ErrorCode::kInvalidArgument);
  const FinishedList& f = s.commit({p.step_id, ids, one, stop, {}});
  CHECK(f.ids.size() == 1 && f.reasons[0] == static_cast<int32_t>(FinishReason::kStopToken));
  CHECK(error_of([&] { (void)s.commit({p.step_id, ids, one, stop, {}}); }) == ErrorCode::kProtocol);
  CHECK(error_of([&] { s.abort(a); }) == ErrorCode::kUnknownRequest);
  CHECK(error_of([&] { (void)s.submit(iota_tokens(100), 1, {}); }) == ErrorCode::kCapacity);
  CHECK(error_of([&] { (void)s.submit({}, 1, {}); }) == ErrorCode::kInvalidArgument);
  CHECK(error_of([] { Scheduler bad(Config{0, 1, 1, 1, 0}); }) == ErrorCode::kInvalidArgument);
  // Checked before any pool memory exists (this pool would need tens of GiB).
  CHECK(error_of([] { Scheduler bad(Config{64, 1 << 30, 1, 1, 0}); }) == ErrorCode::kInvalidArgument);
  CHECK_OK(s.check_invariants());
}

static void test_preemption_by_recompute() {
  // 6 pages of 4 tokens; two requests that together need more than the pool.
  Scheduler s(Config{4, 6, 64, 4, 0});
  const int32_t a = s.submit(iota_tokens(8), 12, {});
  const int32_t b = s.submit(iota_tokens(8, 50), 12, {});
  int64_t steps = 0;
  bool a_done = false, b_done = false;
  while (!(a_done && b_done) && ++steps < 1000) {
    const Plan& p = s.step();
    std::vector<int32_t> ids = p.req_ids, ns(p.sample.begin(), p.sample.end());
    std::vector<int32_t> toks(std::accumulate(ns.begin(), ns.end(), 0), 3);
    for (int32_t id : s.commit({p.step_id, ids, ns, toks, {}}).ids) (id == a ? a_done : b_done) = id == a || id == b;
    CHECK_OK(s.check_invariants());
  }
  CHECK(a_done && b_done);
  CHECK(s.stats().preemptions >= 1);
}

static void test_speculative_rollback() {
  Scheduler s(Config{4, 32, 64, 4, 3});
  const int32_t a = s.submit(iota_tokens(6), 50, {});
  const Plan& p1 = s.step();  // prefill
  std::vector<int32_t> ids = p1.req_ids, one = {1}, tok = {9};
  (void)s.commit({p1.step_id, ids, one, tok, {}});
  const Plan& p2 = s.step();  // decode with 3 draft slots: positions 6..9, 3 pages total
  CHECK(p2.input_tokens.size() == 4 && p2.input_tokens[1] == -1 && p2.draft_slots[0] == 3);
  CHECK(p2.append_rows.size() == 1);
  std::vector<int32_t> ns = {1};  // all drafts rejected, bonus token only
  (void)s.commit({p2.step_id, ids, ns, tok, {}});
  const Plan& p3 = s.step();
  CHECK(p3.truncate_rows.empty() && p3.append_rows.empty());  // draft pages kept for reuse
  std::vector<int32_t> ns3 = {4}, toks3 = {1, 2, 3, 4};  // all 3 accepted + bonus
  (void)s.commit({p3.step_id, ids, ns3, toks3, {}});
  CHECK_OK(s.check_invariants());
  s.abort(a);
  CHECK(s.pool().free_count() + s.pool().idle_cached_count() == 32);
  CHECK_OK(s.check_invariants());
}

static void test_random_stress() {
  std::mt19937 rng(1234);
  for (int32_t k : {0, 2}) {
    Scheduler s(Config{4, 40, 24, 6, k});
    std::vector<int32_t> live;
    for (int ev = 0; ev < 20000; ++ev) {
      const int r = rng() % 100;
      if (r < 25) {
        std::vector<int32_t> prompt(1 + rng() % 40);
        for (auto& t : prompt) t = rng() % 8;  // tiny vocabulary: lots of shared prefixes
        const std::vector<int32_t> stops = {static_cast<int32_t>(rng() % 8)};
        live.push_back(s.submit(prompt, 1 + rng() % 20, stops));
      } else if (r < 28 && !live.empty()) {
        const std::size_t i = rng() % live.size();
        s.abort(live[i]);
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        const Plan& p = s.step();
        std::vector<int32_t> ids = p.req_ids, ns, toks;
        for (std::size_t i = 0; i < ids.size(); ++i) {
          const int32_t n = p.sample[i] ? 1 + static_cast<int32_t>(rng() % (p.draft_slots[i] + 1)) : 0;
          ns.push_back(n);
          for (int32_t j = 0; j < n; ++j) toks.push_back(rng() % 8);
        }
        for (int32_t id : s.commit({p.step_id, ids, ns, toks, {}}).ids) std::erase(live, id);
      }
      CHECK_OK(s.check_invariants());
    }
    for (int32_t id : live) s.abort(id);
    CHECK(s.pool().free_count() + s.pool().idle_cached_count() == 40);
    CHECK_OK(s.check_invariants());
  }
}

int main() {
  test_page_pool();
  test_prefix_cache_match_dedupe_evict();
  test_lifecycle_and_prefix_reuse();
  test_stop_token_and_errors();
  test_preemption_by_recompute();
  test_speculative_rollback();
  test_random_stress();
  std::puts("all scheduler C++ tests passed");
  return 0;
}
