"""A fedjax_bn algorithm as a Flower App (``docs/deploy.md``)."""
