// prefix_cache.hpp: prefix cache over page-aligned token blocks, as a hash chain.
//
// A cached page is identified by (parent page, the page's tokens): the key is a hash of both,
// the entry is verified on lookup (parent link and tokens compared), so a reported hit is always
// the exact common prefix. Cached pages form a forest through their parent links; uncaching a
// page uncaches its whole subtree, so a cached page's parent is always cached and still holds the
// content it had when the child was linked. Eviction takes the least recently released idle
// cached page (PagePool's LRU). Why a hash chain and not a radix tree: one O(1) probe per page,
// flat arrays only, and no node splitting, since sharing is page-granular anyway.
//
// Owns: the index, the parent/child links, and a copy of each cached page's tokens.
// Does not own: page references (PageLists do) or the pool (borrowed, must outlive it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenspeed/page_pool.hpp"

namespace tokenspeed {

class PrefixCache {
 public:
  PrefixCache(PagePool& pool, int32_t page_size);
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  [[nodiscard]] int32_t page_size() const noexcept { return page_size_; }

  // Longest cached chain matching tokens[0, max_pages * page_size). Appends the matched pages
  // to `out` (no references taken). Returns the number of pages matched.
  int32_t match(const int32_t* tokens, int32_t max_pages, std::vector<int32_t>& out) const;

  // Offers `page` (owned by the caller, full, KV computed) as the child of `parent` (-1: root)
  // holding `block`. Returns the page now canonical for that content: `page` itself, or an
  // already cached page with the same parent and tokens, or -1 if a different entry holds the
  // same hash (the chain cannot continue; practically never happens).
  [[nodiscard]] int32_t insert(int32_t parent, const int32_t* block, int32_t page);

  // Generation stamp of a cached page's current caching; changes whenever it is re-cached.
  [[nodiscard]] uint32_t generation(int32_t page) const noexcept { return generation_[page]; }

  // Allocates n fresh pages into `into`, evicting LRU pages as needed.
  // Precondition: pool.available() >= n.
  void allocate(int32_t n, PageList& into);

  [[nodiscard]] int64_t evictions() const noexcept { return evictions_; }
  [[nodiscard]] std::string check() const;

 private:
  struct Slot {
    uint64_t key;
    int32_t page;    // -1: empty
    int32_t parent;  // copy of parent_[page]: a lookup verifies without touching per-page arrays
  };
  [[nodiscard]] uint64_t key_of(int32_t parent, const int32_t* block) const noexcept;
  [[nodiscard]] bool holds(int32_t page, int32_t parent, const int32_t* block) const noexcept;
  [[nodiscard]] bool same_tokens(int32_t page, const int32_t* block) const noexcept;
  [[nodiscard]] int64_t find_slot(uint64_t key) const noexcept;  // -1 if absent
  void index_insert(uint64_t key, int32_t page, int32_t parent);
  void index_erase(uint64_t key) noexcept;
  void uncache_subtree(int32_t page);
  void evict_one();

  PagePool& pool_;
  int32_t page_size_;
  std::vector<Slot> slots_;  // open addressing, linear probing, backward-shift deletion
  uint64_t mask_;
  std::vector<uint64_t> key_;        // per page, valid while cached
  std::vector<int32_t> parent_;      // per page, -1 = root
  std::vector<int32_t> first_child_, next_sibling_, prev_sibling_;
  std::vector<uint32_t> generation_;
  std::vector<int32_t> tokens_;      // num_pages * page_size
  std::vector<int32_t> scratch_;     // DFS stack for uncache_subtree
  int64_t evictions_ = 0;
};

}  // namespace tokenspeed
