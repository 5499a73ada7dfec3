"""Policies for the snack-place learner: p(B) = sigmoid(network(hunger))."""

import ml_collections


def linear(weight=20.0, bias=0.0, trainable="bias"):
    """p(B) = sigmoid(weight * hunger + bias). With weight 20 the decision boundary sits at
    hunger 0.5 when the bias reaches -10, the value the articles' training hovers around."""
    return ml_collections.ConfigDict(dict(kind="linear", weight=weight, bias=bias, trainable=trainable, hidden=0))


def mlp(hidden=8, bias=0.0):
    """p(B) = sigmoid(out_w . tanh(hidden_w * hunger + hidden_b) + bias); everything trainable."""
    return ml_collections.ConfigDict(dict(kind="mlp", weight=0.0, bias=bias, trainable="all", hidden=hidden))
