import CoreGraphics
import Foundation
import ImageIO
import MiniCPMVCore
import UIKit

/// Photos in, upright RGB pixels out: decoding happens here at the edge (ImageIO / CoreGraphics);
/// the core only ever sees plain pixel buffers (ImagePixels).
enum ImageLoading {
    /// Decodes encoded image bytes (JPEG, HEIC, PNG...) and applies the EXIF orientation like PIL's
    /// exif_transpose (the core's Exif.applyOrientation on the decoded pixels).
    static func pixels(from data: Data) throws -> ImagePixels {
        guard let source = CGImageSourceCreateWithData(data as CFData, nil),
            let image = CGImageSourceCreateImageAtIndex(source, 0, nil)
        else {
            throw CoreError.invalid("the photo could not be decoded")
        }
        let properties = CGImageSourceCopyPropertiesAtIndex(source, 0, nil) as? [CFString: Any]
        let fromImageIO = (properties?[kCGImagePropertyOrientation] as? NSNumber)?.intValue ?? 0
        let orientation = fromImageIO != 0 ? fromImageIO : Exif.jpegOrientation([UInt8](data))
        return Exif.applyOrientation(try pixels(from: image), orientation)
    }

    /// A camera capture: UIKit already knows its orientation, so draw it upright first.
    static func pixels(from image: UIImage) throws -> ImagePixels {
        let format = UIGraphicsImageRendererFormat()
        format.scale = 1
        let upright = UIGraphicsImageRenderer(size: image.size, format: format).image { _ in
            image.draw(in: CGRect(origin: .zero, size: image.size))
        }
        guard let cg = upright.cgImage else {
            throw CoreError.invalid("the capture has no bitmap")
        }
        return try pixels(from: cg)
    }

    /// The bitmap as 8-bit sRGB RGB (alpha dropped, as PIL's convert("RGB") on an opaque photo).
    static func pixels(from image: CGImage) throws -> ImagePixels {
        let width = image.width
        let height = image.height
        var rgba = [UInt8](repeating: 0, count: width * height * 4)
        let drawn: Bool = rgba.withUnsafeMutableBytes { buffer in
            guard
                let context = CGContext(
                    data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8, bytesPerRow: width * 4,
                    space: CGColorSpace(name: CGColorSpace.sRGB)!,
                    bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)
            else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else {
            throw CoreError.invalid("could not draw a \(width)x\(height) image")
        }
        return try ImagePixels(width: width, height: height, rgba: rgba)
    }

    /// A fixed synthetic 1000x600 picture for benchmark runs when no photo is chosen.
    static func benchmarkImage() -> ImagePixels {
        let width = 1000
        let height = 600
        var rgb = [UInt8](repeating: 0, count: width * height * 3)
        for y in 0..<height {
            for x in 0..<width {
                let i = (y * width + x) * 3
                rgb[i] = UInt8(x * 255 / width)
                rgb[i + 1] = UInt8(y * 255 / height)
                rgb[i + 2] = UInt8(((x / 50 + y / 50) % 2) * 200)
            }
        }
        return try! ImagePixels(width: width, height: height, rgb: rgb)
    }
}
