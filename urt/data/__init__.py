"""The data layer: the sample schema (`urt.data.schema`), WebDataset shards (`urt.data.shards`), video
decoding and frame sampling (`urt.data.video`), `urt data inspect` (`urt.data.inspect`) and converters."""

from urt.data.schema import Sample, Video

__all__ = ["Sample", "Video"]
