"""Model files shared by the services: importing pretrained models into the store's format."""
