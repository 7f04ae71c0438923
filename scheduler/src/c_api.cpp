// c_api.cpp: the C ABI. Every entry point converts C++ exceptions into a status code and the
// thread-local last-error text; nothing is thrown across the boundary.
#include <memory>
#include <new>
#include <string>

#include "tokenspeed/scheduler.hpp"
#include "tokenspeed_scheduler.h"

struct ts_scheduler {
  tokenspeed::Scheduler impl;
  explicit ts_scheduler(const tokenspeed::Config& c) : impl(c) {}
};

namespace {

thread_local std::string g_last_error;

template <class F>
ts_status guarded(F&& body) noexcept {
  try {
    body();
    return TS_OK;
  } catch (const tokenspeed::Error& e) {
    g_last_error = e.what();
    return static_cast<ts_status>(e.code());
  } catch (const std::bad_alloc&) {
    g_last_error = "out of host memory";
    return TS_ERR_INTERNAL;
  } catch (const std::exception& e) {
    g_last_error = std::string("internal error: ") + e.what();
    return TS_ERR_INTERNAL;
  } catch (...) {
    g_last_error = "internal error: unknown exception";
    return TS_ERR_INTERNAL;
  }
}

ts_status null_argument(const char* what) noexcept {
  g_last_error = std::string(what) + ": null pointer argument";
  return TS_ERR_INVALID_ARGUMENT;
}

}  // namespace

extern "C" {

const char* ts_last_error(void) { return g_last_error.c_str(); }

ts_status ts_scheduler_create(const ts_config* config, ts_scheduler** out) {
  if (!config || !out) return null_argument("ts_scheduler_create");
  *out = nullptr;
  return guarded([&] {
    tokenspeed::Config c{config->page_size, config->num_pages, config->max_batch_tokens,
                         config->max_batch_size, config->num_draft_slots};
    *out = std::make_unique<ts_scheduler>(c).release();  // ownership passes to the caller
  });
}

void ts_scheduler_destroy(ts_scheduler* sched) { std::unique_ptr<ts_scheduler> owned(sched); }

ts_status ts_submit(ts_scheduler* s, const int32_t* prompt, int32_t prompt_len, int32_t max_new_tokens,
                    const int32_t* stop_ids, int32_t num_stop_ids, int32_t* out_id) {
  if (!s || !out_id || (!prompt && prompt_len > 0) || (!stop_ids && num_stop_ids > 0)) return null_argument("ts_submit");
  if (prompt_len < 0 || num_stop_ids < 0) {
    g_last_error = "ts_submit: negative length";
    return TS_ERR_INVALID_ARGUMENT;
  }
  return guarded([&] {
    *out_id = s->impl.submit({prompt, static_cast<std::size_t>(prompt_len)}, max_new_tokens,
                             {stop_ids, static_cast<std::size_t>(num_stop_ids)});
  });
}

ts_status ts_abort(ts_scheduler* s, int32_t req_id) {
  if (!s) return null_argument("ts_abort");
  return guarded([&] { s->impl.abort(req_id); });
}

ts_status ts_step(ts_scheduler* s, ts_plan* out) {
  if (!s || !out) return null_argument("ts_step");
  return guarded([&] {
    const tokenspeed::Plan& p = s->impl.step();
    *out = ts_plan{};
    out->step_id = p.step_id;
    out->num_entries = p.num_entries();
    out->num_tokens = static_cast<int32_t>(p.input_tokens.size());
    out->num_truncates = static_cast<int32_t>(p.truncate_rows.size());
    out->num_new_rows = static_cast<int32_t>(p.new_rows.size());
    out->num_appends = static_cast<int32_t>(p.append_rows.size());
    const int32_t* cur = p.arena.data();
    auto take = [&cur](std::size_t n) { const int32_t* at = cur; cur += n; return at; };
    const std::size_t e = p.req_ids.size(), t = p.input_tokens.size();
    out->req_ids = take(e);
    out->rows = take(e);
    out->query_start = take(e + 1);
    out->context_lens = take(e);
    out->sample = take(e);
    out->draft_slots = take(e);
    out->input_tokens = take(t);
    out->positions = take(t);
    out->truncate_rows = take(p.truncate_rows.size());
    out->truncate_lens = take(p.truncate_rows.size());
    out->new_rows = take(p.new_rows.size());
    out->new_row_reqs = take(p.new_rows.size());
    out->append_rows = take(p.append_rows.size());
    out->append_slots = take(p.append_rows.size());
    out->append_pages = take(p.append_rows.size());
    out->arena = p.arena.data();
    out->arena_len = static_cast<int32_t>(p.arena.size());
  });
}

ts_status ts_commit(ts_scheduler* s, const ts_commit_input* in, ts_commit_output* out) {
  if (!s || !in || !out) return null_argument("ts_commit");
  if (in->num_entries < 0 || in->num_tokens < 0 || (in->num_entries > 0 && (!in->req_ids || !in->num_sampled)) ||
      (in->num_tokens > 0 && !in->tokens)) {
    g_last_error = "ts_commit: negative counts or missing arrays";
    return TS_ERR_INVALID_ARGUMENT;
  }
  return guarded([&] {
    tokenspeed::CommitInput c;
    c.step_id = in->step_id;
    const auto n = static_cast<std::size_t>(in->num_entries);
    c.req_ids = {in->req_ids, n};
    c.num_sampled = {in->num_sampled, n};
    c.tokens = {in->tokens, static_cast<std::size_t>(in->num_tokens)};
    if (in->finish) c.finish = {in->finish, n};
    const tokenspeed::FinishedList& f = s->impl.commit(c);
    out->num_finished = static_cast<int32_t>(f.ids.size());
    out->finished_ids = f.ids.data();
    out->finished_reasons = f.reasons.data();
  });
}

ts_status ts_check_invariants(ts_scheduler* s) {
  if (!s) return null_argument("ts_check_invariants");
  return guarded([&] {
    std::string e = s->impl.check_invariants();
    if (!e.empty()) throw tokenspeed::Error(tokenspeed::ErrorCode::kInvariant, e);
  });
}

ts_status ts_get_stats(ts_scheduler* s, ts_stats* out) {
  if (!s || !out) return null_argument("ts_get_stats");
  return guarded([&] {
    const tokenspeed::Stats& st = s->impl.stats();
    const tokenspeed::PagePool& pool = s->impl.pool();
    *out = ts_stats{st.steps, st.preemptions, st.prompt_tokens, st.cached_prompt_tokens, st.computed_tokens,
                    s->impl.num_waiting(), s->impl.num_running(), pool.free_count(), pool.idle_cached_count(),
                    pool.num_pages() - pool.free_count() - pool.idle_cached_count(), pool.num_pages()};
  });
}

ts_status ts_match_prefix(ts_scheduler* s, const int32_t* tokens, int32_t len, int32_t* out_cached_tokens) {
  if (!s || !out_cached_tokens || (!tokens && len > 0)) return null_argument("ts_match_prefix");
  if (len < 0) {
    g_last_error = "ts_match_prefix: negative length";
    return TS_ERR_INVALID_ARGUMENT;
  }
  return guarded([&] { *out_cached_tokens = s->impl.match_prefix({tokens, static_cast<std::size_t>(len)}); });
}

}  // extern "C"
