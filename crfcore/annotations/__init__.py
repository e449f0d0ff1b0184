"""Lesion annotations (see `model` for the model and its readers and writers)."""
from .model import (
    DEFAULT_COLOUR, DEFAULT_GROUP, LESION_CLASS, LESION_COLOUR, MAX_COORDINATE, NEGATIVE_GROUPS,
    POSITIVE_GROUPS, Annotation, AnnotationError, AnnotationWarning, Polygon, asap_xml,
    geojson_feature, load_annotation, read_asap_xml, read_geojson, read_json, read_txt,
    to_asap_xml, to_geojson, to_json_dict, write_annotation,
)
