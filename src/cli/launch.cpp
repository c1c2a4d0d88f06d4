#include "cli/launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <thread>

extern char** environ;

namespace lowbit::cli {
namespace {

std::vector<std::string>& command_line() {
  static std::vector<std::string> args;
  return args;
}

// A port on 127.0.0.1 that nothing listens on now (rank 0 binds it right after).
int free_loopback_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "--nproc: cannot open a socket to find a free port");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  close(fd);
  TORCH_CHECK(ok, "--nproc: cannot find a free loopback port");
  return ntohs(address.sin_port);
}

pid_t spawn_rank(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int error = posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ);
  TORCH_CHECK(error == 0, "--nproc: cannot start a rank process (error ", error, ")");
  return pid;
}

}  // namespace

void remember_command_line(int argc, char** argv) { command_line().assign(argv, argv + argc); }

int run_local_ranks(int world, double timeout_s) {
  const std::string port = std::to_string(free_loopback_port());
  std::vector<pid_t> ranks;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> args = command_line();
    args.insert(args.end(), {"--rank", std::to_string(r), "--port", port});
    ranks.push_back(spawn_rank(args));
  }
  int running = world, failures = 0;
  std::chrono::steady_clock::time_point first_failure;
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      // A failed rank makes the others fail within the timeout; stop any that do not.
      if (failures > 0 && std::chrono::steady_clock::now() - first_failure >
                              std::chrono::duration<double>(timeout_s + 10)) {
        for (pid_t p : ranks)
          if (p > 0) kill(p, SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    for (size_t r = 0; r < ranks.size(); ++r) {
      if (ranks[r] != pid) continue;
      ranks[r] = -1;
      --running;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (ok) continue;
      if (failures++ == 0) first_failure = std::chrono::steady_clock::now();
      if (WIFEXITED(status)) {
        std::fprintf(stderr, "lowbit train: rank %zu of %d exited with status %d\n", r, world, WEXITSTATUS(status));
      } else {
        std::fprintf(stderr, "lowbit train: rank %zu of %d was stopped by signal %d\n", r, world,
                     WIFSIGNALED(status) ? WTERMSIG(status) : 0);
      }
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace lowbit::cli
