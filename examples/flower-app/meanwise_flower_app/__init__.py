"""A Flower App running meanwise's FedAU and AFA-CS (see ../README.md)."""
