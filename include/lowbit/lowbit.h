// lowbit: low-bit optimizer states for LibTorch. Include this for the whole public API.
#pragma once

#include <lowbit/codebook.h>
#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>
#include <lowbit/shampoo.h>
