/* The shim's x86 instruction wrappers: the shared ones. */
#ifndef SHIM_HW_H
#define SHIM_HW_H

#include "x86_insn.h"

#endif
