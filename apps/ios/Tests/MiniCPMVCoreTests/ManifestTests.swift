import XCTest

@testable import MiniCPMVCore

/// BundleManifest on a minimal Core ML manifest (no kit needed): the RoPE positions it can run.
final class ManifestTests: XCTestCase {
    /// A Core ML manifest with the fields the app reads; `rope` adds model.rope_positions.
    private func manifest(rope: String?) -> Data {
        let ropeField = rope.map { ", \"rope_positions\": \"\($0)\"" } ?? ""
        let text = """
            {"schema_version": 1, "family": "minicpm-v-4.7", "target": "ios", "format": "coreml",
             "quantization": "fp16", "max_context": 384,
             "model": {"hidden_size": 64, "vocab_size": 300, "patch_size": 14, "image_token_id": 5,
                       "video_token_id": 6, "num_patches_per_side": 70\(ropeField)},
             "graphs": {
               "vision_encoder": {"file": "vision_encoder.mlpackage", "functions": {"16x": "vision_16x"},
                                  "max_patches": 4896},
               "token_embedding": {"file": "token_embedding.mlpackage"},
               "text_decoder": {"file": "text_decoder.mlpackage",
                                "functions": {"prefill": "prefill", "decode": "decode"},
                                "chunk": {"prefill": 16, "decode": 1}}},
             "state": [],
             "preprocessing": {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14,
                               "slice_mode": true, "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5],
                               "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098,
                               "resample": 3, "use_image_id": true},
             "prompt": {"chat_template": "chat_template.jinja", "stop_ids": [2]},
             "files": {"vision_encoder.mlpackage/Manifest.json": {}, "token_embedding.mlpackage/Manifest.json": {},
                       "text_decoder.mlpackage/Manifest.json": {}, "chat_template.jinja": {}}}
            """
        return Data(text.utf8)
    }

    func testCacheIndexPositionsParse() throws {
        XCTAssertEqual(try BundleManifest(data: manifest(rope: nil)).family, "minicpm-v-4.7")
        XCTAssertEqual(try BundleManifest(data: manifest(rope: "cache")).graphs.prefillChunk, 16)
    }

    func testCanvasPositionsAreRefusedInOneLine() {
        XCTAssertThrowsError(try BundleManifest(data: manifest(rope: "canvas"))) { error in
            let message = String(describing: error)
            XCTAssertTrue(message.contains("model.rope_positions \"canvas\""), message)
            XCTAssertTrue(message.contains("minicpmv-edge chat --bundle"), message)
            XCTAssertEqual(message.split(separator: "\n").count, 1, message)
        }
    }
}
