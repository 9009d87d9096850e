"""The fast paths, each proven equal to higherANML's computation: the functional meta-gradient of ANML
and OML (`functional`, on the hand-derived operations of `derivatives`), several models or tasks as
lanes of one iteration (`batched`), CUDA graphs (`cuda_graphs`), the meta-test on frozen features
(`frozen_features`) and the whole network learning in lanes (`full_network`)."""
