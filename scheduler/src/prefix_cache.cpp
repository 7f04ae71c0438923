#include "tokenspeed/prefix_cache.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <string>

namespace tokenspeed {
namespace {

constexpr uint64_t kMul1 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMul2 = 0xC2B2AE3D27D4EB4Full;

inline uint64_t mix(uint64_t x) noexcept {
  x ^= x >> 31;
  x *= kMul2;
  x ^= x >> 29;
  return x;
}

// NH universal hashing (as in UMAC): sum over token pairs of (a + k_i) * (b + k_{i+1}) in 64-bit
// arithmetic. No dependency chain, so the compiler vectorises it; a 64-token block hashes in a few
// nanoseconds. Collisions only cost a failed verification (holds() compares the tokens).
constexpr int kNhChunk = 64;

struct NhKeys {
  uint32_t k[kNhChunk];
  constexpr NhKeys() : k{} {
    uint64_t x = 0x243F6A8885A308D3ull;
    for (int i = 0; i < kNhChunk; ++i) {
      x += 0x9E3779B97F4A7C15ull;
      uint64_t z = x;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      k[i] = static_cast<uint32_t>(z ^ (z >> 31));
    }
  }
};
constexpr NhKeys kNh{};

uint64_t hash_block(uint64_t seed, const int32_t* tokens, int32_t n) noexcept {
  uint64_t h = seed;
  for (int32_t base = 0; base < n; base += kNhChunk) {
    const int32_t len = std::min(kNhChunk, n - base);
    const int32_t* t = tokens + base;
    uint64_t acc = 0;
    int32_t i = 0;
    for (; i + 2 <= len; i += 2) {
      acc += static_cast<uint64_t>(static_cast<uint32_t>(t[i]) + kNh.k[i]) *
             static_cast<uint64_t>(static_cast<uint32_t>(t[i + 1]) + kNh.k[i + 1]);
    }
    if (i < len) acc += static_cast<uint64_t>(static_cast<uint32_t>(t[i]) + kNh.k[i]) * kMul1;
    h = mix(h ^ acc) + kMul1;
  }
  return mix(h ^ static_cast<uint64_t>(n));
}

}  // namespace

PrefixCache::PrefixCache(PagePool& pool, int32_t page_size)
    : pool_(pool),
      page_size_(page_size),
      key_(pool.num_pages(), 0),
      parent_(pool.num_pages(), -1),
      first_child_(pool.num_pages(), -1),
      next_sibling_(pool.num_pages(), -1),
      prev_sibling_(pool.num_pages(), -1),
      generation_(pool.num_pages(), 0),
      tokens_(static_cast<std::size_t>(pool.num_pages()) * page_size, 0) {
  // Load factor <= 0.5 keeps linear probes short.
  std::size_t cap = std::bit_ceil(static_cast<std::size_t>(pool.num_pages()) * 2 + 2);
  slots_.assign(cap, Slot{0, -1, -1});
  mask_ = cap - 1;
}

uint64_t PrefixCache::key_of(int32_t parent, const int32_t* block) const noexcept {
  return hash_block(mix(static_cast<uint64_t>(static_cast<uint32_t>(parent + 1)) * kMul1), block,
                    page_size_);
}

bool PrefixCache::same_tokens(int32_t page, const int32_t* block) const noexcept {
  return std::memcmp(&tokens_[static_cast<std::size_t>(page) * page_size_], block,
                     sizeof(int32_t) * page_size_) == 0;
}

bool PrefixCache::holds(int32_t page, int32_t parent, const int32_t* block) const noexcept {
  return pool_.is_cached(page) && parent_[page] == parent && same_tokens(page, block);
}

int64_t PrefixCache::find_slot(uint64_t key) const noexcept {
  for (uint64_t i = key & mask_;; i = (i + 1) & mask_) {
    if (slots_[i].page < 0) return -1;
    if (slots_[i].key == key) return static_cast<int64_t>(i);
  }
}

void PrefixCache::index_insert(uint64_t key, int32_t page, int32_t parent) {
  uint64_t i = key & mask_;
  while (slots_[i].page >= 0) i = (i + 1) & mask_;
  slots_[i] = Slot{key, page, parent};
}

void PrefixCache::index_erase(uint64_t key) noexcept {
  const int64_t found = find_slot(key);
  if (found < 0) return;
  // Backward-shift deletion: no tombstones, probes stay short forever.
  uint64_t hole = static_cast<uint64_t>(found);
  for (uint64_t j = (hole + 1) & mask_; slots_[j].page >= 0; j = (j + 1) & mask_) {
    const uint64_t home = slots_[j].key & mask_;
    // Move j into the hole unless its home lies cyclically in (hole, j].
    const bool home_in_between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!home_in_between) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole] = Slot{0, -1, -1};
}

int32_t PrefixCache::match(const int32_t* tokens, int32_t max_pages, std::vector<int32_t>& out) const {
  // Below a cached page, follow its child list (a conversation usually has one continuation):
  // one pointer hop and one compare per page instead of a hash probe into a table far larger than
  // the CPU caches. Many children (a shared system prompt) fall back to the hash index. Both find
  // the same page: cached (parent, tokens) pairs are unique.
  constexpr int kMaxChildScan = 4;
  int32_t parent = -1, matched = 0;
  for (; matched < max_pages; ++matched) {
    const int32_t* block = tokens + static_cast<std::size_t>(matched) * page_size_;
    int32_t page = -1;
    bool scanned_all = false;
    if (parent >= 0) {
      int scanned = 0;
      int32_t c = first_child_[parent];
      for (; c >= 0 && scanned < kMaxChildScan; c = next_sibling_[c], ++scanned) {
        if (same_tokens(c, block)) {
          page = c;
          break;
        }
      }
      scanned_all = page < 0 && c < 0;
    }
    if (page < 0 && !scanned_all) {
      const int64_t s = find_slot(key_of(parent, block));
      if (s >= 0 && slots_[s].parent == parent && same_tokens(slots_[s].page, block)) page = slots_[s].page;
    }
    if (page < 0) break;
    // Long cached prompts are DRAM-bound: start fetching the likely next page's tokens now.
    const int32_t next = first_child_[page];
    if (next >= 0) __builtin_prefetch(&tokens_[static_cast<std::size_t>(next) * page_size_]);
    out.push_back(page);
    parent = page;
  }
  return matched;
}

int32_t PrefixCache::insert(int32_t parent, const int32_t* block, int32_t page) {
  const uint64_t key = key_of(parent, block);
  const int64_t s = find_slot(key);
  if (s >= 0) {
    const int32_t existing = slots_[s].page;
    return slots_[s].parent == parent && same_tokens(existing, block) ? existing : -1;
  }
  index_insert(key, page, parent);
  key_[page] = key;
  parent_[page] = parent;
  prev_sibling_[page] = -1;
  first_child_[page] = -1;
  if (parent >= 0) {
    next_sibling_[page] = first_child_[parent];
    if (first_child_[parent] >= 0) prev_sibling_[first_child_[parent]] = page;
    first_child_[parent] = page;
  } else {
    next_sibling_[page] = -1;
  }
  ++generation_[page];
  std::memcpy(&tokens_[static_cast<std::size_t>(page) * page_size_], block,
              sizeof(int32_t) * page_size_);
  pool_.set_cached(page);
  return page;
}

void PrefixCache::uncache_subtree(int32_t root) {
  // Pre-order collection, then release in reverse: descendants before ancestors.
  scratch_.clear();
  scratch_.push_back(root);
  for (std::size_t i = 0; i < scratch_.size(); ++i) {
    for (int32_t c = first_child_[scratch_[i]]; c >= 0; c = next_sibling_[c]) scratch_.push_back(c);
  }
  for (std::size_t i = scratch_.size(); i-- > 0;) {
    const int32_t p = scratch_[i];
    index_erase(key_[p]);
    const int32_t parent = parent_[p];
    if (parent >= 0) {
      if (prev_sibling_[p] >= 0) next_sibling_[prev_sibling_[p]] = next_sibling_[p];
      else first_child_[parent] = next_sibling_[p];
      if (next_sibling_[p] >= 0) prev_sibling_[next_sibling_[p]] = prev_sibling_[p];
    }
    parent_[p] = first_child_[p] = next_sibling_[p] = prev_sibling_[p] = -1;
    pool_.set_uncached(p);
  }
}

void PrefixCache::evict_one() {
  ++evictions_;
  uncache_subtree(pool_.lru_oldest());
}

void PrefixCache::allocate(int32_t n, PageList& into) {
  for (int32_t i = 0; i < n; ++i) {
    if (pool_.free_count() == 0) evict_one();
    into.adopt(pool_.pop_free());
  }
}

std::string PrefixCache::check() const {
  int32_t indexed = 0;
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.page < 0) continue;
    ++indexed;
    if (!pool_.is_cached(s.page)) return "index points at uncached page " + std::to_string(s.page);
    if (key_[s.page] != s.key) return "index key disagrees with page " + std::to_string(s.page);
    if (parent_[s.page] != s.parent) return "index parent disagrees with page " + std::to_string(s.page);
    if (find_slot(s.key) != static_cast<int64_t>(i)) return "index entry unreachable by probing";
  }
  int32_t cached = 0;
  for (int32_t p = 0; p < pool_.num_pages(); ++p) {
    if (!pool_.is_cached(p)) continue;
    ++cached;
    const int32_t parent = parent_[p];
    if (parent >= 0 && !pool_.is_cached(parent))
      return "cached page " + std::to_string(p) + " has an uncached parent";
    if (key_of(parent, &tokens_[static_cast<std::size_t>(p) * page_size_]) != key_[p])
      return "cached page " + std::to_string(p) + " key does not hash its content";
    // The page must be reachable from its parent's child list.
    bool linked = parent < 0;
    for (int32_t c = parent >= 0 ? first_child_[parent] : -1; c >= 0 && !linked; c = next_sibling_[c])
      linked = c == p;
    if (!linked) return "cached page " + std::to_string(p) + " missing from its parent's children";
  }
  if (cached != indexed) return "cached page count differs from index size";
  return {};
}

}  // namespace tokenspeed
