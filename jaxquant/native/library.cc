// What the library tells jaxquant.native about itself: the jaxlib whose FFI
// headers it was compiled against (XLA runs a handler built against its own
// or an older FFI API, not a newer one, so jaxquant.native loads the
// kernels only where the running jaxlib is at least this version), and the
// inner loops this CPU runs.

#include <cstdint>

#include "common.h"

#ifndef JAXQUANT_FFI_HEADERS
#error "build with -DJAXQUANT_FFI_HEADERS=\"<jaxlib version>\" (setup.py)"
#endif

extern "C" const char* JaxquantFfiHeaders() { return JAXQUANT_FFI_HEADERS; }

extern "C" int32_t JaxquantBestVariant() { return jaxquant::Best(); }

extern "C" int32_t JaxquantSupports(int32_t variant) {
  return jaxquant::Supported(variant) ? 1 : 0;
}
