// lowbit: low-bit optimizer states for LibTorch. Include this for the whole public API.
#pragma once

#include <lowbit/codebook.h>
#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>
#include <lowbit/shampoo.h>
#include <lowbit/state_bytes.h>
#include <lowbit/hessian.h>
#include <lowbit/sophia.h>
#include <lowbit/adahessian.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/layer_statistics.h>
#include <lowbit/kfac.h>
