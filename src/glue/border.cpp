// Frees what the glue malloc'ed (error messages, module bytes) on the Rust side's behalf.
#include "border.h"

extern "C" {

void ta_free(char* p) { std::free(p); }

}  // extern "C"
