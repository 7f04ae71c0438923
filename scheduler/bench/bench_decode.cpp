// C++-only timing of step() + commit() with N running decodes (no Python, no cffi): the floor
// under the Python numbers in docs/perf/scheduler.md. Build: see docs/perf/scheduler.md.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "tokenspeed/scheduler.hpp"

int main(int argc, char** argv) {
  using namespace tokenspeed;
  const int n = argc > 1 ? std::atoi(argv[1]) : 1024;
  Scheduler s(Config{64, n * 64, std::max(8192, n), n, 0});
  std::vector<int32_t> prompt(200);
  for (int i = 0; i < n; ++i) {
    for (auto& t : prompt) t = std::rand() % 50000;
    (void)s.submit(prompt, 1 << 20, {});
  }
  std::vector<double> us, step_us;
  std::vector<int32_t> ns, toks;
  for (int it = 0; it < 3000; ++it) {
    auto t0 = std::chrono::steady_clock::now();
    const Plan& p = s.step();
    auto tm = std::chrono::steady_clock::now();
    ns.assign(p.sample.begin(), p.sample.end());
    int total = 0;
    for (int32_t x : ns) total += x;
    toks.assign(total, 1);
    (void)s.commit({p.step_id, p.req_ids, ns, toks, {}});
    auto t1 = std::chrono::steady_clock::now();
    if (it >= 100) {
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      step_us.push_back(std::chrono::duration<double, std::micro>(tm - t0).count());
    }
  }
  std::sort(us.begin(), us.end());
  std::sort(step_us.begin(), step_us.end());
  std::printf("step() alone median %.2f us\n", step_us[step_us.size() / 2]);
  std::printf("decodes=%d step+commit median %.2f us, p90 %.2f us\n", n, us[us.size() / 2], us[us.size() * 9 / 10]);
}
