"""kNN monitor: leave-one-out weighted kNN top-1 on a labeled folder with frozen features."""
import torch
import torch.nn.functional as F

from pretrain import loader


@torch.no_grad()
def extract_features(encoder, folder, device, image_size=224, batch_size=64, workers=2,
                     transform=None, seed=None):
    """L2-normalised pooled features (fc skipped) and labels of every image in `folder`, seen
    through `transform` (default: the evaluation resize and centre crop; a random one draws
    from `seed`, epoch 0 and the image index)."""
    dataset = loader.ImageFiles(folder, transform or loader.eval_transform(image_size), seed)
    data = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    was_training = encoder.training
    encoder.eval()
    fc, encoder.fc = encoder.fc, torch.nn.Identity()
    feats, labels = [], []
    try:
        for x, y in data:
            feats.append(F.normalize(encoder(x.to(device)).float(), dim=1).cpu())
            labels.append(y)
    finally:
        encoder.fc = fc
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def weighted_knn_predict(feats, labels, k=20, t=0.07):
    """Leave-one-out predictions: each sample is voted on by its k nearest other samples,
    weighted by exp(similarity / t) (the instance-discrimination kNN protocol)."""
    sim = feats @ feats.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(feats) - 1)
    top_sim, top_idx = sim.topk(k, dim=1)
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(len(feats), num_classes)
    votes.scatter_add_(1, labels[top_idx], (top_sim / t).exp())
    return votes.argmax(1)


def knn_accuracy(encoder, folder, device, image_size=224, k=20, t=0.07):
    feats, labels = extract_features(encoder, folder, device, image_size)
    return (weighted_knn_predict(feats, labels, k, t) == labels).float().mean().item() * 100
