// Which jaxlib's FFI headers the kernels were compiled against. XLA runs a
// handler built against its own or an older FFI API, not a newer one, so
// jaxquant.native loads the kernels only where the running jaxlib is at
// least this version.

#ifndef JAXQUANT_FFI_HEADERS
#error "build with -DJAXQUANT_FFI_HEADERS=\"<jaxlib version>\" (setup.py)"
#endif

extern "C" const char* JaxquantFfiHeaders() { return JAXQUANT_FFI_HEADERS; }
