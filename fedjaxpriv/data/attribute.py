"""A tabular population with a binary sensitive attribute (``data.dataset: attribute``), for attribute inference
(``attacks.attribute``): the attribute is a model input and shifts the labels, with client-specific group
proportions, stored in ``FederatedData.attributes``."""

from __future__ import annotations

import numpy as np

from fedjaxpriv.data.federated import Dataset, FederatedData, from_client_lists
from fedjaxpriv.data.synthetic import SeedLike, as_generator


def attribute_population(seed: SeedLike, num_clients: int = 20, examples_per_client: int = 64, dim: int = 10,
                         num_classes: int = 2, attribute_effect: float = 1.0, group_concentration: float = 0.5,
                         num_test: int = 1000) -> tuple[FederatedData, Dataset, np.ndarray]:
    """Tabular population with a binary sensitive attribute that is an input and shifts the labels.

    Client c draws its group share ``p_c ~ Beta(g, g)`` (g = ``group_concentration``; small g gives clients
    a clear majority group); each example draws ``s ~ Bernoulli(p_c)``, features ``z ~ N(0, I_dim)`` and a
    label ``y ~ softmax(z W + attribute_effect (2 s - 1) (u + z V))`` with global ``W, V [dim, K]`` and
    ``u [K]`` ~ N(0, 1): the attribute shifts the labels and changes how the features act on them (an
    interaction only a nonlinear model captures). The model input is ``x = [z, s]`` (the attribute is the LAST
    column), float32 [dim + 1].

    Returns:
      (population with ``attributes`` = s [T], test set drawn with p = 0.5, test attributes [num_test]).
    """
    if num_clients < 1 or examples_per_client < 1 or dim < 1 or num_classes < 2:
        raise ValueError(f"need num_clients ({num_clients}), examples_per_client ({examples_per_client}), "
                         f"dim ({dim}) >= 1 and num_classes ({num_classes}) >= 2.")
    if group_concentration <= 0:
        raise ValueError(f"group_concentration={group_concentration} must be > 0.")
    rng = as_generator(seed)
    weights = rng.normal(size=(dim, num_classes))
    shift = rng.normal(size=num_classes)
    interaction = rng.normal(size=(dim, num_classes))

    def draw(n: int, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = (rng.random(n) < share).astype(np.int32)
        z = rng.normal(size=(n, dim))
        logits = z @ weights + attribute_effect * (2 * s[:, None] - 1) * (shift + z @ interaction)
        y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1).astype(np.int32)
        return np.concatenate([z, s[:, None]], axis=1).astype(np.float32), y, s

    shares = rng.beta(group_concentration, group_concentration, size=num_clients)
    xs, ys, ss = zip(*(draw(examples_per_client, p) for p in shares))
    population = from_client_lists(xs, ys, ss)
    test_x, test_y, test_s = draw(num_test, 0.5)
    return population, Dataset(test_x, test_y), test_s
