#if canImport(CoreML)
    import CoreML
    import Foundation
    import MiniCPMVCore

    /// The Engine over a Core ML bundle (docs/coreml.md): vision_encoder.mlpackage (functions
    /// vision_16x / vision_4x), token_embedding.mlpackage and text_decoder.mlpackage (functions
    /// prefill / decode sharing weights and states). Apple-only: not compiled by `make test`.
    ///
    /// - Each .mlpackage is compiled on the device once (`MLModel.compileModel(at:)`) and the .mlmodelc
    ///   kept in Application Support, keyed by the bundle's manifest checksum, so later launches load
    ///   it directly.
    /// - One MLModel per function, loaded once (`MLModelConfiguration.functionName`); every slice of
    ///   every image goes through the same vision instance (the official apps saw memory grow when
    ///   slices were run through fresh ANE instances).
    /// - One MLState per turn, made by the decode function (`makeState()`, zeroed buffers) and passed to
    ///   every prefill chunk and every decode step (`prediction(from:using:)`): both functions declare
    ///   the same state buffers (names and shapes; the exporter checks they follow state_specs).
    /// - Compute units per package from ComputePlan (vision .cpuAndGPU by default, see its reasons).
    final class CoreMLEngine: Engine {
        final class State: DecoderState {
            let mlState: MLState
            init(_ mlState: MLState) { self.mlState = mlState }
        }

        let info: ModelInfo
        let manifest: BundleManifest
        private var visionModels: [DownsampleMode: MLModel] = [:]
        private let embedding: MLModel
        private let prefill: MLModel
        private let decode: MLModel
        private let plan: ComputePlan
        private let compiled: [String: URL]

        /// Compiles (first launch) and loads the bundle's packages. Slow: call off the main thread.
        static func load(bundle: URL, manifest: BundleManifest, plan: ComputePlan = .default) async throws
            -> CoreMLEngine
        {
            var compiled = [String: URL]()
            for file in Set([manifest.graphs.visionFile, manifest.graphs.embeddingFile, manifest.graphs.decoderFile]) {
                compiled[file] = try await compiledModel(bundle.appendingPathComponent(file), manifest: manifest)
            }
            let g = manifest.graphs
            let engine = CoreMLEngine(
                manifest: manifest, compiled: compiled, plan: plan,
                embedding: try await model(compiled[g.embeddingFile]!, function: nil, units: plan.embedding),
                prefill: try await model(compiled[g.decoderFile]!, function: g.prefillFunction, units: plan.decoder),
                decode: try await model(compiled[g.decoderFile]!, function: g.decodeFunction, units: plan.decoder))
            // the default mode's vision function is loaded now, so the first question does not pay for it
            _ = try await engine.visionModel(manifest.sliceConfig.downsampleMode)
            return engine
        }

        private init(
            manifest: BundleManifest, compiled: [String: URL], plan: ComputePlan, embedding: MLModel, prefill: MLModel,
            decode: MLModel
        ) {
            self.manifest = manifest
            self.info = manifest.info
            self.plan = plan
            self.compiled = compiled
            self.embedding = embedding
            self.prefill = prefill
            self.decode = decode
        }

        static func units(_ u: ComputePlan.Units) -> MLComputeUnits {
            switch u {
            case .cpuOnly: return .cpuOnly
            case .cpuAndGPU: return .cpuAndGPU
            case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
            case .all: return .all
            }
        }

        static func model(_ url: URL, function: String?, units: ComputePlan.Units) async throws -> MLModel {
            let config = MLModelConfiguration()
            config.computeUnits = CoreMLEngine.units(units)
            config.functionName = function  // nil: the package's default (only) function
            return try await MLModel.load(contentsOf: url, configuration: config)
        }

        /// The compiled .mlmodelc of a package, compiling it on first use.
        static func compiledModel(_ package: URL, manifest: BundleManifest) async throws -> URL {
            let fm = FileManager.default
            let support = try fm.url(
                for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
            let key = manifest.manifestSha256.isEmpty ? "unsigned" : String(manifest.manifestSha256.prefix(16))
            let dir = support.appendingPathComponent("compiled-models/\(key)", isDirectory: true)
            let target = dir.appendingPathComponent(package.deletingPathExtension().lastPathComponent + ".mlmodelc")
            if fm.fileExists(atPath: target.path) {
                return target
            }
            try fm.createDirectory(at: dir, withIntermediateDirectories: true)
            let temporary = try await MLModel.compileModel(at: package)
            if fm.fileExists(atPath: target.path) {
                try fm.removeItem(at: target)
            }
            try fm.moveItem(at: temporary, to: target)
            return target
        }

        private func visionModel(_ mode: DownsampleMode) async throws -> MLModel {
            if let m = visionModels[mode] {
                return m
            }
            let m = try await CoreMLEngine.model(
                compiled[manifest.graphs.visionFile]!, function: try manifest.visionFunction(mode), units: plan.vision)
            visionModels[mode] = m
            return m
        }

        // ---- the contract -----------------------------------------------------------------------

        func visionEncoder(patches: [Float], positionIds: [Int64], mode: DownsampleMode) async throws -> [Float] {
            let rows = positionIds.count
            try ComputePlan.checkSlice(patchRows: rows, graphs: manifest.graphs, mode: mode)
            let inputs = try MLDictionaryFeatureProvider(dictionary: [
                "patches": try CoreMLEngine.array(patches, shape: [rows, patches.count / rows]),
                "position_ids": try CoreMLEngine.array(positionIds.map { Int32($0) }, shape: [rows]),
            ])
            let out = try await visionModel(mode).prediction(from: inputs)
            return try CoreMLEngine.floats(out, "embeds")
        }

        func tokenEmbedding(_ ids: [Int]) async throws -> [Float] {
            let inputs = try MLDictionaryFeatureProvider(dictionary: [
                "ids": try CoreMLEngine.array(ids.map { Int32($0) }, shape: [ids.count])
            ])
            return try CoreMLEngine.floats(try await embedding.prediction(from: inputs), "embeds")
        }

        func newState() throws -> DecoderState {
            State(decode.makeState())
        }

        func prefillChunk(embeds: [Float], nValid: Int, startPos: Int, state: DecoderState) async throws -> [Float] {
            try await step(prefill, embeds: embeds, rows: info.chunkSize, nValid: nValid, pos: startPos, state: state)
        }

        func decodeStep(embed: [Float], pos: Int, state: DecoderState) async throws -> [Float] {
            try await step(decode, embeds: embed, rows: 1, nValid: 1, pos: pos, state: state)
        }

        private func step(_ model: MLModel, embeds: [Float], rows: Int, nValid: Int, pos: Int, state: DecoderState)
            async throws -> [Float]
        {
            guard let s = state as? State else {
                throw CoreError.invalid("not a Core ML decoder state")
            }
            let inputs = try MLDictionaryFeatureProvider(dictionary: [
                "embeds": try CoreMLEngine.array(embeds, shape: [1, rows, info.hiddenSize]),
                "start_pos": try CoreMLEngine.array([Int32(pos)], shape: [1]),
                "n_valid": try CoreMLEngine.array([Int32(nValid)], shape: [1]),
            ])
            let out = try await model.prediction(from: inputs, using: s.mlState)
            return try CoreMLEngine.floats(out, "logits")
        }

        // ---- MLMultiArray in and out ------------------------------------------------------------

        static func array(_ values: [Float], shape: [Int]) throws -> MLMultiArray {
            let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
            a.withUnsafeMutableBufferPointer(ofType: Float.self) { buffer, _ in
                _ = buffer.initialize(from: values)
            }
            return a
        }

        static func array(_ values: [Int32], shape: [Int]) throws -> MLMultiArray {
            let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
            a.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
                _ = buffer.initialize(from: values)
            }
            return a
        }

        /// An output as row-major float32, whatever its dtype (fp16 here) and strides.
        static func floats(_ out: MLFeatureProvider, _ preferred: String) throws -> [Float] {
            let name = out.featureNames.contains(preferred) ? preferred : out.featureNames.sorted().first ?? preferred
            guard let a = out.featureValue(for: name)?.multiArrayValue else {
                throw CoreError.invalid("Core ML output \(name) is not a multi-array")
            }
            let shape = a.shape.map(\.intValue)
            let strides = a.strides.map(\.intValue)
            let count = shape.reduce(1, *)
            var result = [Float](repeating: 0, count: count)
            func offset(_ flat: Int) -> Int {
                var rest = flat
                var off = 0
                for d in stride(from: shape.count - 1, through: 0, by: -1) {
                    off += (rest % shape[d]) * strides[d]
                    rest /= shape[d]
                }
                return off
            }
            switch a.dataType {
            case .float16:
                a.withUnsafeBufferPointer(ofType: Float16.self) { p in
                    for i in 0..<count { result[i] = Float(p[offset(i)]) }
                }
            case .float32:
                a.withUnsafeBufferPointer(ofType: Float.self) { p in
                    for i in 0..<count { result[i] = p[offset(i)] }
                }
            default:
                for i in 0..<count { result[i] = a[i].floatValue }
            }
            return result
        }
    }
#endif
