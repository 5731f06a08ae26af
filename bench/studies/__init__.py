"""One-off studies: each answered one question about catdog once (a threshold, a decoder, a
layer's cost); their figures are in bench/RESULTS.md beside the benchmarks'."""
