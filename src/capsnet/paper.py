"""The paper's constants, written once (Sabour, Frosst & Hinton 2017). No imports: the
settings, the losses and the models all read them from here."""

ROUTING_ITERATIONS = 3  # r in Procedure 1
M_POS, M_NEG, LAMBDA = 0.9, 0.1, 0.5  # margin loss: m+, m-, down-weighting of absent classes
# Reconstruction loss weight on the SUM of squared pixel errors (= 0.392 on their mean for
# 28x28), so that it does not dominate the margin loss.
RECON_WEIGHT = 0.0005
