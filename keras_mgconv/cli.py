"""The `keras-mgconv` command.

    keras-mgconv summary --filters 256 --group-size 16

prints a MultigridConv2D's level widths and its weights against a Conv2D's.
Bad arguments print one line and exit with status 2.
"""

import argparse
import sys


def _summary(args):
    # Imported here so that `keras-mgconv --help` answers without loading TensorFlow.
    from keras_mgconv._keras import keras
    from keras_mgconv.layers import MultigridConv2D

    input_channels = args.input_channels or args.filters
    input_shape = (None, None, None, input_channels)
    layer = MultigridConv2D(
        args.filters, args.kernel_size, strides=args.strides, padding="same",
        group_size=args.group_size, coarsest_channels=args.coarsest_channels)
    layer.build(input_shape)
    conv = keras.layers.Conv2D(args.filters, args.kernel_size, strides=args.strides)
    conv.build(input_shape)
    print(f"MultigridConv2D({args.filters}, {args.kernel_size}, "
          f"group_size={args.group_size}) on {input_channels} input channels")
    print(f"  levels (channels, finest first): {', '.join(map(str, layer.levels))}")
    print(f"  connector: {'none' if layer.connector is None else f'{layer.connector.groups} group(s)'}")
    print(f"  parameters: {layer.count_params():,} "
          f"(Conv2D: {conv.count_params():,}, ratio {layer.count_params() / conv.count_params():.3f})")


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-mgconv",
        description="Multigrid-in-channels convolutional networks for Keras.")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser(
        "summary", help="show a MultigridConv2D's hierarchy and parameters against Conv2D")
    summary.add_argument("--filters", type=int, default=256)
    summary.add_argument("--kernel-size", type=int, default=3)
    summary.add_argument("--strides", type=int, default=1)
    summary.add_argument("--group-size", type=int, default=16)
    summary.add_argument("--coarsest-channels", type=int, default=None)
    summary.add_argument("--input-channels", type=int, default=None,
                         help="input width (default: --filters)")
    summary.set_defaults(run=_summary)
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        parser.exit(2, f"keras-mgconv {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
