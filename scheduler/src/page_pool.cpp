#include "tokenspeed/page_pool.hpp"

#include <string>

namespace tokenspeed {

PagePool::PagePool(int32_t num_pages)
    : refcount_(num_pages, 0),
      cached_(num_pages, 0),
      in_lru_(num_pages, 0),
      lru_prev_(num_pages, -1),
      lru_next_(num_pages, -1) {
  free_stack_.reserve(num_pages);
  // Page 0 is handed out first: makes plans easy to read and to mirror in the reference.
  for (int32_t p = num_pages - 1; p >= 0; --p) free_stack_.push_back(p);
}

void PagePool::ref(int32_t page) noexcept {
  if (refcount_[page]++ == 0 && in_lru_[page]) lru_remove(page);
}

void PagePool::unref(int32_t page) noexcept {
  if (--refcount_[page] != 0) return;
  if (cached_[page]) {
    lru_push_back(page);
  } else {
    free_stack_.push_back(page);
  }
}

int32_t PagePool::pop_free() noexcept {
  const int32_t page = free_stack_.back();
  free_stack_.pop_back();
  refcount_[page] = 1;
  return page;
}

void PagePool::set_uncached(int32_t page) noexcept {
  cached_[page] = 0;
  if (in_lru_[page]) {
    lru_remove(page);
    free_stack_.push_back(page);
  }
}

void PagePool::lru_push_back(int32_t page) noexcept {
  in_lru_[page] = 1;
  lru_prev_[page] = lru_tail_;
  lru_next_[page] = -1;
  if (lru_tail_ >= 0) lru_next_[lru_tail_] = page; else lru_head_ = page;
  lru_tail_ = page;
  ++lru_size_;
}

void PagePool::lru_remove(int32_t page) noexcept {
  const int32_t prev = lru_prev_[page], next = lru_next_[page];
  if (prev >= 0) lru_next_[prev] = next; else lru_head_ = next;
  if (next >= 0) lru_prev_[next] = prev; else lru_tail_ = prev;
  lru_prev_[page] = lru_next_[page] = -1;
  in_lru_[page] = 0;
  --lru_size_;
}

std::string PagePool::check() const {
  const int32_t n = num_pages();
  std::vector<uint8_t> on_free(n, 0);
  for (int32_t p : free_stack_) {
    if (p < 0 || p >= n) return "free stack holds out-of-range page " + std::to_string(p);
    if (on_free[p]++) return "page " + std::to_string(p) + " is on the free stack twice";
  }
  int32_t lru_seen = 0;
  for (int32_t p = lru_head_, prev = -1; p >= 0; prev = p, p = lru_next_[p]) {
    if (lru_prev_[p] != prev) return "LRU list back link broken at page " + std::to_string(p);
    if (++lru_seen > n) return "LRU list has a cycle";
  }
  if (lru_seen != lru_size_) return "LRU size counter disagrees with the list";
  for (int32_t p = 0; p < n; ++p) {
    const bool is_free = on_free[p], idle = in_lru_[p], owned = refcount_[p] > 0;
    if (refcount_[p] < 0) return "page " + std::to_string(p) + " has a negative refcount";
    if (int(is_free) + int(idle) + int(owned) != 1)
      return "page " + std::to_string(p) + " is not exactly one of free/owned/idle-cached (free=" +
             std::to_string(is_free) + " idle=" + std::to_string(idle) +
             " refcount=" + std::to_string(refcount_[p]) + ")";
    if (is_free && cached_[p]) return "free page " + std::to_string(p) + " is marked cached";
    if (idle && !cached_[p]) return "LRU page " + std::to_string(p) + " is not cached";
  }
  return {};
}

PageList::PageList(PageList&& other) noexcept : pool_(other.pool_), pages_(std::move(other.pages_)) {
  other.pages_.clear();
}

PageList& PageList::operator=(PageList&& other) noexcept {
  if (this != &other) {
    truncate(0);
    pool_ = other.pool_;
    pages_ = std::move(other.pages_);
    other.pages_.clear();
  }
  return *this;
}

void PageList::truncate(std::size_t keep) noexcept {
  while (pages_.size() > keep) {
    pool_->unref(pages_.back());
    pages_.pop_back();
  }
}

}  // namespace tokenspeed
