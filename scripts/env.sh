# Shared settings of the build scripts (sourced, not run).
LOWBIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOWBIT_BUILD="${LOWBIT_BUILD:-$LOWBIT_ROOT/build}"
# ccache keeps rebuilds cheap; the sloppiness makes it accept precompiled headers.
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
# Paths below the checkout hash relative, so a clone elsewhere (CI's) reuses the cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$LOWBIT_ROOT}"

lowbit_configure_and_build() {
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  if [ ! -f "$LOWBIT_BUILD/build.ninja" ]; then
    cmake -S "$LOWBIT_ROOT" -B "$LOWBIT_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}"
  fi
  cmake --build "$LOWBIT_BUILD" -j "$(nproc)"
}
