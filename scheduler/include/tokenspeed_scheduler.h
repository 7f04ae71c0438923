/* tokenspeed_scheduler.h: the only door between Python (cffi) and the C++ scheduler.
 *
 * Opaque handle, POD structs, status codes plus a thread-local last-error text.
 * No C++ exception ever crosses this header: every entry point catches and converts.
 *
 * Ownership: the caller owns `ts_scheduler*` (create/destroy). Pointers inside `ts_plan` and
 * `ts_commit_output` point into buffers owned by the scheduler; they stay valid until the next
 * call of ts_step, ts_commit, ts_abort or ts_scheduler_destroy on the same handle. Copy them out.
 *
 * cffi's cdef reads the part between the CDEF markers (no preprocessor there).
 */
#ifndef TOKENSPEED_SCHEDULER_H
#define TOKENSPEED_SCHEDULER_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
/* CDEF BEGIN: build_cffi.py hands the text between these markers to ffi.cdef */
typedef struct ts_scheduler ts_scheduler; /* opaque */


typedef enum ts_status {
  TS_OK = 0,
  TS_ERR_INVALID_ARGUMENT = 1, /* out-of-range value, malformed arrays */
  TS_ERR_UNKNOWN_REQUEST = 2,  /* id never submitted, or already finished/aborted */
  TS_ERR_PROTOCOL = 3,         /* step twice without commit, commit without step (double commit) */
  TS_ERR_CAPACITY = 4,         /* a request that could never fit the KV pool */
  TS_ERR_INVARIANT = 5,        /* ts_check_invariants found a broken invariant */
  TS_ERR_INTERNAL = 6          /* std::bad_alloc or any other unexpected failure */
} ts_status;

typedef enum ts_finish_reason {
  TS_FINISH_STOP_TOKEN = 1, /* sampled one of the request's stop ids */
  TS_FINISH_LENGTH = 2,     /* reached max_new_tokens */
  TS_FINISH_ENGINE = 3      /* the execution plane said so in commit (finish flag) */
} ts_finish_reason;

typedef struct ts_config {
  int32_t page_size;            /* tokens per KV page, >= 1 */
  int32_t num_pages;            /* KV pool size in pages, >= 1 */
  int32_t max_batch_tokens;     /* token budget per step (prefill chunks + decodes + drafts) */
  int32_t max_batch_size;       /* max requests per step; also the number of page-table rows */
  int32_t num_draft_slots;      /* k speculative slots per decoding request (0 = no spec) */
} ts_config;

/* One step's plan. Every array is int32. Per-entry arrays have num_entries elements
 * (query_start has num_entries + 1); per-token arrays have num_tokens elements.
 * Page-table deltas: apply truncations first, then new rows, then appends. */
typedef struct ts_plan {
  int64_t step_id;
  int32_t num_entries;
  int32_t num_tokens;
  const int32_t* req_ids;         /* [num_entries] */
  const int32_t* rows;            /* [num_entries] page-table row of each request */
  const int32_t* query_start;     /* [num_entries + 1] offsets into the per-token arrays */
  const int32_t* context_lens;    /* [num_entries] tokens already in KV before this step */
  const int32_t* sample;          /* [num_entries] 1 if the engine samples after this entry */
  const int32_t* draft_slots;     /* [num_entries] trailing query tokens that are draft slots */
  const int32_t* input_tokens;    /* [num_tokens] token ids; draft slots hold -1 (engine fills) */
  const int32_t* positions;       /* [num_tokens] absolute positions */
  int32_t num_truncates;
  const int32_t* truncate_rows;   /* [num_truncates] row ... */
  const int32_t* truncate_lens;   /* [num_truncates] ... keeps only its first N pages (0 = freed) */
  int32_t num_new_rows;
  const int32_t* new_rows;        /* [num_new_rows] row now owned by ... */
  const int32_t* new_row_reqs;    /* [num_new_rows] ... this request (its pages follow as appends) */
  int32_t num_appends;
  const int32_t* append_rows;     /* [num_appends] row ... */
  const int32_t* append_slots;    /* [num_appends] ... page index within the row ... */
  const int32_t* append_pages;    /* [num_appends] ... gets this KV page id */
  int32_t num_copies;             /* always 0 here: shared pages are full and immutable */
  const int32_t* copy_src;
  const int32_t* copy_dst;
  int32_t num_zeros;              /* always 0 here: attention never reads past seq_len */
  const int32_t* zero_pages;
  /* All the arrays above live back to back in one arena, in this order: req_ids, rows,
   * query_start, context_lens, sample, draft_slots, input_tokens, positions, truncate_rows,
   * truncate_lens, new_rows, new_row_reqs, append_rows, append_slots, append_pages.
   * Bindings copy the arena once instead of wrapping fifteen pointers. */
  const int32_t* arena;
  int32_t arena_len;
} ts_plan;

typedef struct ts_commit_input {
  int64_t step_id;                /* the plan being committed */
  int32_t num_entries;            /* must equal the plan's num_entries */
  const int32_t* req_ids;         /* [num_entries] must match the plan, in order */
  const int32_t* num_sampled;     /* [num_entries] 0 when sample==0, else 1 + accepted drafts */
  int32_t num_tokens;             /* length of tokens = sum(num_sampled) */
  const int32_t* tokens;          /* [sum(num_sampled)] accepted drafts then the bonus token */
  const uint8_t* finish;          /* [num_entries] or NULL: engine-forced finish */
} ts_commit_input;

typedef struct ts_commit_output {
  int32_t num_finished;
  const int32_t* finished_ids;    /* [num_finished] */
  const int32_t* finished_reasons;/* [num_finished] ts_finish_reason */
} ts_commit_output;

typedef struct ts_stats {
  int64_t steps;
  int64_t preemptions;
  int64_t prompt_tokens;          /* first admissions only */
  int64_t cached_prompt_tokens;   /* prefix-cache hits at first admission */
  int64_t computed_tokens;        /* all tokens scheduled (prefill + decode + drafts) */
  int32_t num_waiting;
  int32_t num_running;
  int32_t free_pages;
  int32_t cached_idle_pages;      /* cached, unreferenced, evictable (LRU) */
  int32_t owned_pages;            /* refcount > 0 */
  int32_t num_pages;
} ts_stats;

const char* ts_last_error(void);
ts_status ts_scheduler_create(const ts_config* config, ts_scheduler** out);
void ts_scheduler_destroy(ts_scheduler* sched);
ts_status ts_submit(ts_scheduler* sched, const int32_t* prompt, int32_t prompt_len,
                    int32_t max_new_tokens, const int32_t* stop_ids, int32_t num_stop_ids,
                    int32_t* out_id);
ts_status ts_abort(ts_scheduler* sched, int32_t req_id);
ts_status ts_step(ts_scheduler* sched, ts_plan* out);
ts_status ts_commit(ts_scheduler* sched, const ts_commit_input* input, ts_commit_output* out);
ts_status ts_check_invariants(ts_scheduler* sched);
ts_status ts_get_stats(ts_scheduler* sched, ts_stats* out);
ts_status ts_match_prefix(ts_scheduler* sched, const int32_t* tokens, int32_t len,
                          int32_t* out_cached_tokens);
/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif
