// page_pool.hpp: the KV page pool (refcounts, free stack, LRU of idle cached pages) and
// PageList, the RAII owner of page references.
//
// Every page is in exactly one of three places:
//   free        refcount 0, not cached, on the free stack
//   owned       refcount > 0 (cached or not); held by one or more PageLists
//   idle cached refcount 0, cached, on the LRU list (evictable)
// The pool does not know what "cached" means beyond the flag; PrefixCache sets it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace tokenspeed {

class PagePool {
 public:
  explicit PagePool(int32_t num_pages);
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  [[nodiscard]] int32_t num_pages() const noexcept { return static_cast<int32_t>(refcount_.size()); }
  [[nodiscard]] int32_t refcount(int32_t page) const noexcept { return refcount_[page]; }
  [[nodiscard]] bool is_cached(int32_t page) const noexcept { return cached_[page] != 0; }
  [[nodiscard]] int32_t free_count() const noexcept { return static_cast<int32_t>(free_stack_.size()); }
  [[nodiscard]] int32_t idle_cached_count() const noexcept { return lru_size_; }
  // Pages an allocation may obtain: free ones plus evictable ones.
  [[nodiscard]] int32_t available() const noexcept { return free_count() + lru_size_; }
  [[nodiscard]] int32_t lru_oldest() const noexcept { return lru_head_; }

  // Adds one reference. An idle cached page leaves the LRU list.
  void ref(int32_t page) noexcept;
  // Drops one reference. At zero: a cached page joins the LRU tail, others go back to free.
  void unref(int32_t page) noexcept;
  // Pops a free page with refcount 1. Precondition: free_count() > 0.
  [[nodiscard]] int32_t pop_free() noexcept;
  // PrefixCache bookkeeping. set_uncached on an idle page moves it to the free stack.
  void set_cached(int32_t page) noexcept { cached_[page] = 1; }
  void set_uncached(int32_t page) noexcept;

  // Checks the three-places invariant; returns an empty string when it holds.
  [[nodiscard]] std::string check() const;

 private:
  void lru_push_back(int32_t page) noexcept;
  void lru_remove(int32_t page) noexcept;

  std::vector<int32_t> refcount_;
  std::vector<uint8_t> cached_;
  std::vector<uint8_t> in_lru_;
  std::vector<int32_t> lru_prev_, lru_next_;  // intrusive doubly linked list, -1 terminated
  int32_t lru_head_ = -1, lru_tail_ = -1, lru_size_ = 0;
  std::vector<int32_t> free_stack_;  // back() is handed out next
};

// Owns one reference on each listed page (a page may appear in many PageLists, never twice in
// one). Destruction and truncation release references last page first, so a chain's leaf
// reaches the LRU list before its parent and is evicted first.
class PageList {
 public:
  PageList() = default;
  explicit PageList(PagePool& pool) : pool_(&pool) {}
  PageList(const PageList&) = delete;
  PageList& operator=(const PageList&) = delete;
  PageList(PageList&& other) noexcept;
  PageList& operator=(PageList&& other) noexcept;
  ~PageList() { truncate(0); }

  // Takes over one reference the caller already holds (from pop_free or ref).
  void adopt(int32_t page) { pages_.push_back(page); }
  // Releases every page from index `keep` on, last first.
  void truncate(std::size_t keep) noexcept;
  [[nodiscard]] std::span<const int32_t> pages() const noexcept { return pages_; }
  [[nodiscard]] std::size_t size() const noexcept { return pages_.size(); }
  [[nodiscard]] int32_t operator[](std::size_t i) const noexcept { return pages_[i]; }

 private:
  PagePool* pool_ = nullptr;
  std::vector<int32_t> pages_;
};

}  // namespace tokenspeed
