"""Router: accepted samples to continual pre-training, SFT and RL (filtered -> accepted.*)."""
