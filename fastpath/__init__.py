"""The fast paths, each proven equal to higherANML's computation: the functional meta-gradient
(`functional`), several models or tasks as lanes of one iteration (`batched`), CUDA graphs
(`cuda_graphs`), the meta-test on frozen features (`frozen_features`), and OML's network and
meta-gradient in the same style (`oml`)."""
